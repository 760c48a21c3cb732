"""On a 4-bit base nothing weight-sized is saved for backward, in any method: the frozen weight is
dequantized again in backward instead (counted with torch.autograd.graph.saved_tensors_hooks)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import slimtune
from slimtune.injection import make_adapter
from slimtune.layers.base import AdaptedLayer
from slimtune.memory.measure import saved_storages
from slimtune.quant import Linear4bit

D, TOKENS = 512, 16

METHODS = {
    "lora": slimtune.LoraConfig(r=8),
    "lora-dropout": slimtune.LoraConfig(r=8, dropout=0.1),
    "dora": slimtune.LoraConfig(r=8, use_dora=True),
    "dora-dropout": slimtune.LoraConfig(r=8, dropout=0.1, use_dora=True),
    "bottleneck": slimtune.BottleneckConfig(size=16, dropout=0.1),
}


def saved_for_backward(cfg, compute_dtype: torch.dtype, trainable_bias: bool) -> dict[int, int]:
    """{storage: bytes} saved by one adapted 4-bit (D x D) layer on a (TOKENS, D) input."""
    torch.manual_seed(0)
    q = Linear4bit.from_linear(nn.Linear(D, D), compute_dtype=compute_dtype)
    q.bias.requires_grad_(trainable_bias)
    layer = AdaptedLayer(q).train()
    adapter = make_adapter(q, "layer", cfg).train()
    layer.add("a", adapter)
    if hasattr(adapter, "init_magnitude"):
        adapter.init_magnitude(q)
    x = torch.randn(TOKENS, D, dtype=compute_dtype, requires_grad=True)
    record: dict[int, int] = {}
    with saved_storages(layer, record):
        out = layer(x)
    out.float().sum().backward()  # backward runs: what was saved was enough
    assert x.grad is not None and all(p.grad is not None for p in adapter.adapter_params())
    return record


@pytest.mark.parametrize("trainable_bias", [False, True], ids=["frozen-bias", "trainable-bias"])
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("method", list(METHODS))
def test_nothing_weight_sized_is_saved_on_a_4bit_base(method, compute_dtype, trainable_bias):
    record = saved_for_backward(METHODS[method], compute_dtype, trainable_bias)
    # a dequantized weight is D * D elements of >= 2 bytes; every activation here is TOKENS * D
    assert max(record.values()) <= TOKENS * D * 4 < D * D
    # in all: at most the input, its 1-byte dropout mask, two (tokens, d) outputs and small factors
    assert sum(record.values()) <= TOKENS * D * (4 + 1 + 4 + 4) + 64 * 1024
