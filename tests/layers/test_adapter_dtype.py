"""Adapters on a bf16/fp16 (or 4-bit) base are created in fp32 by default, as Hugging Face PEFT does
(AdamW's small updates round away in bf16); ``adapter_dtype="base"`` keeps the base's dtype."""

from __future__ import annotations

import pytest
import torch

import slimtune
from slimtune.config import ConfigError, config_from_dict, load_config, save_config
from slimtune.control import adapted_layers
from slimtune.layers.amp import adapter_dtype
from tests.conftest import tiny_llama, tokens

CONFIGS = {
    "lora": lambda **kw: slimtune.LoraConfig(r=4, target_modules="all-linear", **kw),
    "dora": lambda **kw: slimtune.LoraConfig(r=4, target_modules="all-linear", use_dora=True, dropout=0.1, **kw),
    "bottleneck": lambda **kw: slimtune.BottleneckConfig(size=8, **kw),
}


def _adapter_dtypes(model) -> set[torch.dtype]:
    return {p.dtype for _, layer in adapted_layers(model) for a in layer.adapters.values()
            for p in a.adapter_params()}


def _train_step(model, lr: float = 1e-3) -> dict[str, torch.Tensor]:
    """One AdamW step; returns the trainable tensors before it."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.AdamW(params.values(), lr=lr)
    ids = tokens()
    loss = model.train()(ids, labels=ids).loss
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    return before


@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("base", [torch.bfloat16, torch.float16, "nf4"], ids=str)
def test_16bit_and_4bit_bases_get_fp32_adapters_that_train(method, base):
    model = tiny_llama()
    model.to(torch.bfloat16 if base == "nf4" else base)
    if base == "nf4":  # a bf16 model whose linears become NF4 computing in bf16 (QLoRA)
        slimtune.quantize_model(model, compute_dtype=torch.bfloat16)
    slimtune.inject(model, CONFIGS[method]())
    assert _adapter_dtypes(model) == {torch.float32}
    before = _train_step(model)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, name
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed  # at step 1 AdamW moves every parameter with a non-zero gradient by ~lr


@pytest.mark.parametrize("method", list(CONFIGS))
def test_adapter_dtype_base_keeps_the_base_dtype(method):
    model = tiny_llama().to(torch.bfloat16)
    slimtune.inject(model, CONFIGS[method](adapter_dtype="base"))
    assert _adapter_dtypes(model) == {torch.bfloat16}
    _train_step(model)
    assert all(p.grad.dtype == torch.bfloat16 for p in model.parameters() if p.requires_grad)


def test_fp32_adapters_keep_updates_a_bf16_adapter_rounds_away():
    # why fp32 is the default: a 1e-5-sized AdamW update to a weight of size ~0.1 is below bf16's
    # resolution there (2^-11 ~ 5e-4), so a bf16 adapter does not move at all
    fp32, bf16 = tiny_llama().to(torch.bfloat16), tiny_llama().to(torch.bfloat16)
    slimtune.inject(fp32, CONFIGS["lora"]())
    slimtune.inject(bf16, CONFIGS["lora"](adapter_dtype="base"))
    for model in (fp32, bf16):
        with torch.no_grad():
            for _, layer in adapted_layers(model):
                layer.adapters["default"].lora_B.fill_(0.1)
    moved = {}
    for name, model in (("fp32", fp32), ("bf16", bf16)):
        before = _train_step(model, lr=1e-5)
        moved[name] = sum(int((p != before[n]).sum()) for n, p in model.named_parameters()
                          if p.requires_grad and "lora_B" in n)
    assert moved["fp32"] > 0 and moved["bf16"] == 0


def test_fp32_bases_keep_their_dtype():
    assert adapter_dtype(torch.float32) == torch.float32 and adapter_dtype(torch.float64) == torch.float64
    assert adapter_dtype(torch.bfloat16) == torch.float32 and adapter_dtype(torch.float16, "base") == torch.float16
    with pytest.raises(ValueError, match="adapter_dtype='fp8': must be one of float32, base"):
        adapter_dtype(torch.bfloat16, "fp8")


@pytest.mark.parametrize("make, method", [(slimtune.LoraConfig, "lora"), (slimtune.BottleneckConfig, "bottleneck")])
def test_config_field_is_validated_and_round_trips(make, method, tmp_path):
    with pytest.raises(ConfigError, match=rf"^{method}.adapter_dtype='bf16': must be one of float32, base$"):
        make(adapter_dtype="bf16")
    cfg = make(adapter_dtype="base")
    assert cfg.to_dict()["adapter_dtype"] == "base" and config_from_dict(cfg.to_dict()) == cfg
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    assert make().adapter_dtype == "float32"
