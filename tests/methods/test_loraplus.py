"""LoRA+ parameter groups against Hugging Face PEFT's create_loraplus_optimizer (the oracle)."""

import re

import pytest
import torch

from slimtune import LoraConfig, inject
from slimtune.methods.loraplus import create_loraplus_optimizer, loraplus_param_groups
from tests.conftest import tiny_bert_cls, tiny_llama

peft = pytest.importorskip("peft")
from peft.optimizers import create_loraplus_optimizer as peft_loraplus  # noqa: E402


def canonical(name: str) -> str:
    name = re.sub(r"\.(adapters|copies|modules_to_save|default)(?=\.|$)", "", name.replace("base_model.model.", ""))
    for old, new in (("lora_magnitude_vector.weight", "magnitude"), ("lora_A.weight", "lora_A"),
                     ("lora_B.weight", "lora_B"), ("lora_embedding_A", "lora_A"), ("lora_embedding_B", "lora_B")):
        name = name.replace(old, new)
    return name


CASES = {
    "bert-embedding-head-bias": (tiny_bert_cls, LoraConfig(r=4, target_modules=("word_embeddings", "query", "value"),
                                                           modules_to_save=("classifier",), bias="all"), "SEQ_CLS"),
    "llama-dora": (tiny_llama, LoraConfig(r=4, target_modules="all-linear", use_dora=True), "CAUSAL_LM"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_groups_equal_peft(case):
    build, cfg, task = CASES[case]
    ours = build()
    inject(ours, cfg)
    theirs = peft.get_peft_model(build(), peft.LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, target_modules=cfg.target_modules if isinstance(cfg.target_modules, str)
        else list(cfg.target_modules), modules_to_save=list(cfg.modules_to_save) or None, bias=cfg.bias,
        use_dora=cfg.use_dora, task_type=task))
    kw = dict(lr=1e-4, loraplus_lr_ratio=8.0, loraplus_lr_embedding=1e-5, loraplus_weight_decay=0.01)
    popt = peft_loraplus(theirs, torch.optim.AdamW, **kw)
    sopt = create_loraplus_optimizer(ours, lr=1e-4, ratio=8.0, lr_embedding=1e-5, weight_decay=0.01)
    pnames = {id(p): canonical(n) for n, p in theirs.named_parameters()}
    snames = {id(p): canonical(n) for n, p in ours.named_parameters()}
    assert len(popt.param_groups) == len(sopt.param_groups) == 4
    for pg, sg in zip(popt.param_groups, sopt.param_groups):
        assert (pg["lr"], pg["weight_decay"]) == (sg["lr"], sg["weight_decay"])
        assert sorted(pnames[id(p)] for p in pg["params"]) == sorted(snames[id(p)] for p in sg["params"])
    assert sum(len(g["params"]) for g in sopt.param_groups) == sum(p.requires_grad for p in ours.parameters())
    if case.startswith("bert"):  # every group is populated in this case
        assert all(g["params"] for g in sopt.param_groups)


def test_errors_name_the_argument():
    model = tiny_llama()
    with pytest.raises(ValueError, match="no trainable parameters"):
        loraplus_param_groups(model.requires_grad_(False), lr=1e-4)
    inject(model, LoraConfig())
    with pytest.raises(ValueError, match=r"loraplus.ratio=0: must be a positive number"):
        loraplus_param_groups(model, lr=1e-4, ratio=0)
