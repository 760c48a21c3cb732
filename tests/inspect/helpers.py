"""Adapter folders for the inspect tests: saved by slimtune and by PEFT, on the tiny Llama of tests.conftest."""

from __future__ import annotations

from pathlib import Path

import peft
import torch

import slimtune
from tests.conftest import randomize_adapters, tiny_llama


def slimtune_adapter(folder: Path, seed: int = 1, **config) -> Path:
    """A trained-looking slimtune adapter (random A and B) on tiny_llama, saved to ``folder``."""
    model = tiny_llama()
    slimtune.inject(model, slimtune.LoraConfig(**{"r": 4, "alpha": 8, "target_modules": "all-linear", **config}))
    randomize_adapters(model, seed=seed)
    return slimtune.save_adapter(model, folder)


def peft_adapter(folder: Path, seed: int = 2, **config) -> Path:
    """The same through PEFT's own get_peft_model / save_pretrained (no slimtune metadata in the file)."""
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**{"r": 4, "lora_alpha": 8,
                                                                 "target_modules": "all-linear", **config}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:  # PEFT's own parameter names: randomize what it trains
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if "magnitude" in name else 0.0))
    model.save_pretrained(folder)
    return folder


def low_rank_adapter(folder: Path, true_rank: int, r: int = 8, **config) -> Path:
    """A slimtune adapter of rank r whose every update has rank ``true_rank`` < r (B's columns span fewer
    directions): compressing it to true_rank must lose nothing."""
    model = tiny_llama()
    slimtune.inject(model, slimtune.LoraConfig(**{"r": r, "alpha": 2 * r, "target_modules": "all-linear", **config}))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, layer in slimtune.control.adapted_layers(model):
            a = layer.adapters["default"]
            a.lora_A.copy_(torch.randn(a.lora_A.shape, generator=g) * 0.1)
            d_out = a.lora_B.shape[0]
            a.lora_B.copy_(torch.randn(d_out, true_rank, generator=g) @ torch.randn(true_rank, r, generator=g) * 0.05)
    return slimtune.save_adapter(model, folder)


def peft_model(folder: Path) -> peft.PeftModel:
    return peft.PeftModel.from_pretrained(tiny_llama(), folder).eval()


def peft_deltas(folder: Path) -> dict[str, torch.Tensor]:
    """Module name -> PEFT's own get_delta_weight: the oracle for dW."""
    model = peft_model(folder)
    prefix = "base_model.model."
    return {name[len(prefix):]: m.get_delta_weight("default").double() for name, m in model.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer) and "default" in m.lora_A}
