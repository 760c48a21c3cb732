"""The path most users take: slimtune adapters trained inside Hugging Face ``Trainer`` with ``bf16=True``.

On CPU, ``TrainingArguments(bf16=True)`` runs every forward under ``torch.autocast("cpu", torch.bfloat16)``:
the fused LoRA / DoRA / 4-bit functions crashed there in backward before the hardening issue. Each case trains a
few steps and checks that the loss is finite, every adapter parameter moved (fp32 updates that do not round
away), the frozen base did not, and the saved adapter reloads onto a fresh base with equal logits.
"""

from __future__ import annotations

import pytest
import torch

import slimtune
from slimtune.files import adapter_tensors
from tests.conftest import tiny_llama, tokens

CASES = {
    "lora-dropout": dict(config=slimtune.LoraConfig(r=4, alpha=8, dropout=0.1, target_modules="all-linear")),
    "dora-dropout": dict(config=slimtune.LoraConfig(r=4, alpha=8, dropout=0.1, use_dora=True,
                                                    target_modules=("q_proj", "v_proj", "down_proj"))),
    "bottleneck": dict(config=slimtune.BottleneckConfig(size=8)),
    "lora-bf16-base": dict(config=slimtune.LoraConfig(r=4, target_modules="all-linear"), base=torch.bfloat16),
    "qlora": dict(config=slimtune.LoraConfig(r=4, dropout=0.1, target_modules="all-linear"), nf4=True),
    "qdora": dict(config=slimtune.LoraConfig(r=4, use_dora=True, target_modules=("q_proj", "v_proj")), nf4=True),
}


def _model(case: dict) -> torch.nn.Module:
    model = tiny_llama()
    if case.get("base"):
        model = model.to(case["base"])
    if case.get("nf4"):
        slimtune.quantize_model(model, compute_dtype=torch.float32)
    return model


def _train(model: torch.nn.Module, out_dir) -> float:
    from transformers import Trainer, TrainingArguments

    ids = tokens(batch=16, seq=16, seed=3)
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(output_dir=str(out_dir), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                             bf16=True, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
                             disable_tqdm=True, dataloader_num_workers=0, seed=0)
    result = Trainer(model=model, args=args, train_dataset=data).train()
    return result.training_loss


@pytest.mark.parametrize("name", CASES)
def test_trains_under_hf_trainer_bf16(name, tmp_path):
    case = CASES[name]
    model = _model(case)
    slimtune.prepare(model, case["config"])
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: t.detach().clone() for n, t in model.state_dict().items()
              if n not in trainable and t.is_floating_point()}
    assert trainable and all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)

    loss = _train(model, tmp_path / "run")

    assert torch.isfinite(torch.tensor(loss))
    moved = {n: not torch.equal(p.detach(), trainable[n]) for n, p in model.named_parameters() if p.requires_grad}
    assert all(moved.values()), [n for n, m in moved.items() if not m][:5]
    state = model.state_dict()
    assert all(torch.equal(state[n], t) for n, t in frozen.items())

    # Trainer (accelerate) leaves model.forward wrapped in autocast, so compare tensors rather than logits.
    slimtune.save_adapter(model, tmp_path / "adapter")
    fresh = _model(case)
    slimtune.load_adapter(fresh, tmp_path / "adapter")
    trained, loaded = adapter_tensors(model), adapter_tensors(fresh)
    assert trained.keys() == loaded.keys() and all(torch.equal(trained[k], loaded[k]) for k in trained)


def _trainer(model, out_dir, callbacks, **extra):
    from transformers import Trainer, TrainingArguments

    ids = tokens(batch=16, seq=16, seed=3)
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(output_dir=str(out_dir), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                             use_cpu=True, report_to=[], logging_steps=1, disable_tqdm=True,
                             dataloader_num_workers=0, seed=0, **extra)
    return Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)


@pytest.mark.parametrize("name", ["lora-dropout", "dora-dropout", "qlora"])
def test_checkpointing_bf16_and_save_strategy_write_adapters_peft_loads(name, tmp_path):
    """gradient_checkpointing=True + bf16=True + save_strategy='steps': every checkpoint-N/ holds the adapter as
    it was at step N, and PEFT's PeftModel.from_pretrained(base, checkpoint) gives slimtune's logits."""
    from peft import PeftModel

    from slimtune.train.hf import SaveAdapterCallback

    case = CASES[name]
    model = _model(case)
    slimtune.prepare(model, case["config"])
    trainer = _trainer(model, tmp_path / "run", [SaveAdapterCallback()], bf16=True, gradient_checkpointing=True,
                       save_strategy="steps", save_steps=2)
    assert torch.isfinite(torch.tensor(trainer.train().training_loss))
    assert model.is_gradient_checkpointing

    final, mid = tmp_path / "run" / "checkpoint-4", tmp_path / "run" / "checkpoint-2"
    for ckpt in (mid, final):
        assert (ckpt / "adapter_config.json").is_file() and (ckpt / "adapter_model.safetensors").is_file()
    from safetensors.torch import load_file

    saved, earlier = load_file(final / "adapter_model.safetensors"), load_file(mid / "adapter_model.safetensors")
    assert saved.keys() == earlier.keys() and any(not torch.equal(saved[k], earlier[k]) for k in saved)
    assert sorted(adapter_tensors(model)) == sorted(saved)  # the trained adapter, all of it
    assert all(torch.equal(adapter_tensors(model)[k].cpu(), saved[k]) for k in saved)

    # PEFT wraps nn.Linear only (not slimtune's Linear4bit): a QLoRA adapter is loaded onto the unquantized base
    def base():
        return _model({**case, "nf4": False})

    ids = tokens(batch=2, seq=16, seed=9)
    ours = base()
    slimtune.load_adapter(ours, final)
    peft_model = PeftModel.from_pretrained(base(), str(final)).eval()
    with torch.no_grad():
        want, got = ours.eval()(ids).logits, peft_model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
