"""Gradient checkpointing + adapter dropout: the recomputed forward must draw the same dropout masks as the
first one (LoraLinear/DoRA draw each mask's seed from torch's global RNG; torch's non-reentrant checkpoint
restores that RNG state before recomputing), so the gradients equal those of the same run without
checkpointing. Oracle: the same model, seed and batch trained without checkpointing."""

from __future__ import annotations

import pytest
import torch

import slimtune
from slimtune.layers.lora import LoraLinear
from slimtune.train.model import enable_checkpointing
from tests.conftest import randomize_adapters, tiny_llama, tokens

IDS = tokens(batch=2, seq=12, seed=5)


def _gradients(checkpointing: bool, use_dora: bool, seed: int = 7) -> tuple[dict[str, torch.Tensor], int]:
    """(trainable gradients, adapter forward calls) of one forward/backward in train mode."""
    model = tiny_llama()
    slimtune.inject(model, slimtune.LoraConfig(r=4, alpha=8, dropout=0.1, target_modules="all-linear",
                                               use_dora=use_dora))
    randomize_adapters(model)
    model.config.use_cache = False
    if checkpointing:
        enable_checkpointing(model)
    model.train()
    calls = [0]
    adapter = next(m for m in model.modules() if isinstance(m, LoraLinear))
    adapter.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    torch.manual_seed(seed)
    model(input_ids=IDS, labels=IDS).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, calls[0]


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_checkpointed_gradients_with_dropout_equal_the_plain_ones(use_dora):
    plain, plain_calls = _gradients(checkpointing=False, use_dora=use_dora)
    ckpt, ckpt_calls = _gradients(checkpointing=True, use_dora=use_dora)
    assert (plain_calls, ckpt_calls) == (1, 2)  # checkpointing really recomputed the layer in the backward
    other, _ = _gradients(checkpointing=False, use_dora=use_dora, seed=8)
    assert max(float((other[n] - plain[n]).abs().max()) for n in plain) > 1e-4  # the dropout masks matter
    worst = max(float((ckpt[n] - plain[n]).abs().max()) for n in plain)
    assert worst < 1e-6, worst
