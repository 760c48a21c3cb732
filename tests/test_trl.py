"""A slimtune-injected model trains inside TRL's ``SFTTrainer`` as it is (TRL tokenizes the text, builds the labels,
pads), and the checkpoints it writes hold an adapter that PEFT loads with slimtune's logits."""

from __future__ import annotations

import pytest
import torch

import slimtune
from slimtune.files import adapter_tensors
from tests.sweep.conftest import tiny_model_folder

pytest.importorskip("trl")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("trl") / "tiny")


def _base(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


@pytest.mark.parametrize("config", [
    slimtune.LoraConfig(r=4, alpha=8, dropout=0.1, target_modules="all-linear"),
    slimtune.LoraConfig(r=4, alpha=8, use_dora=True, target_modules=("q_proj", "v_proj")),
], ids=["lora", "dora"])
def test_sft_trainer_trains_and_checkpoints_load_in_peft(folder, config, tmp_path):
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from slimtune.data import shakespeare_text
    from slimtune.train.hf import SaveAdapterCallback

    tokenizer = AutoTokenizer.from_pretrained(folder)
    lines = [line for line in shakespeare_text("romeo").splitlines() if len(line) > 30][:32]
    model = _base(folder)
    slimtune.prepare(model, config)
    before = {k: v.clone() for k, v in adapter_tensors(model).items()}
    args = SFTConfig(output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                     use_cpu=True, report_to=[], logging_steps=1, disable_tqdm=True, save_strategy="steps",
                     save_steps=2, max_length=32, packing=False, seed=0, dataloader_num_workers=0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list([{"text": t} for t in lines]),
                         processing_class=tokenizer, callbacks=[SaveAdapterCallback()])
    assert trainer.model is model  # no PEFT wrapping, no special casing: slimtune's layers train as they are
    loss = trainer.train().training_loss
    assert torch.isfinite(torch.tensor(loss))
    after = adapter_tensors(model)
    assert after.keys() == before.keys() and all(not torch.equal(after[k], before[k]) for k in after)

    ckpt = tmp_path / "run" / "checkpoint-4"
    ours = _base(folder)
    slimtune.load_adapter(ours, ckpt)
    assert all(torch.equal(adapter_tensors(ours)[k], after[k].detach()) for k in after)
    peft_model = PeftModel.from_pretrained(_base(folder), str(ckpt)).eval()
    ids = tokenizer(lines[:2], return_tensors="pt", padding=True).input_ids
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, ours.eval()(ids).logits, rtol=1e-4, atol=1e-4)
