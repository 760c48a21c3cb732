"""Merge for export: adapters go into a dequantized base, the result saves as a plain Hugging Face model.

The base is dequantized to float32, the adapters are merged in float32, and only then is the model cast to
the export dtype, so each weight is rounded once. Re-quantizing the merged model is optional; the error it
adds is measured against the merged float32 weights, layer by layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from slimtune.atomic import atomic_folder
from slimtune.quant.linear4bit import check_dtype
from slimtune.quant.nf4 import check_block_size, dequantize_nf4, quantize_nf4


@dataclass(frozen=True)
class RequantError:
    """Relative error ||W - deq(q(W))|| / ||W|| of re-quantizing merged weights, per layer and overall."""

    per_layer: dict[str, float]
    overall: float

    def __str__(self) -> str:
        worst = max(self.per_layer.items(), key=lambda kv: kv[1]) if self.per_layer else ("-", 0.0)
        return (f"re-quantizing to NF4 adds a relative weight error of {self.overall:.4f} overall "
                f"(worst layer {worst[0]}: {worst[1]:.4f}) over {len(self.per_layer)} layers")


def merge_for_export(model: nn.Module, dtype: torch.dtype = torch.float16) -> nn.Module:
    """Dequantize every 4-bit layer to float32, merge and remove the adapters, cast to ``dtype``.

    Returns the plain model (the same object, or its unwrapped base). Raises ValueError for a bad dtype.
    """
    from slimtune.control import merge_and_unload
    from slimtune.quant.convert import dequantize_model

    check_dtype(dtype, "dtype")
    dequantize_model(model, torch.float32)
    model = merge_and_unload(model, safe=True)
    return model.to(dtype)


def requantize_error(model: nn.Module, keep: tuple[str, ...] = ("lm_head",), block_size: int = 64,
                     double_quant: bool = True) -> RequantError:
    """What NF4 re-quantization of ``model``'s Linear weights would cost, without changing the model."""
    from slimtune.quant.convert import matches

    check_block_size(block_size)
    per_layer, num, den = {}, 0.0, 0.0
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and not matches(name, tuple(keep)):
            w = m.weight.detach().float()
            packed, state = quantize_nf4(w, block_size, double_quant)
            err = (dequantize_nf4(packed, state, torch.float32) - w).pow(2).sum().item()
            ref = w.pow(2).sum().item()
            per_layer[name] = (err / max(ref, 1e-30)) ** 0.5
            num, den = num + err, den + ref
    return RequantError(per_layer, (num / max(den, 1e-30)) ** 0.5)


def save_pretrained_atomic(model: nn.Module, out_dir: str | Path, tokenizer=None) -> Path:
    """``model.save_pretrained`` (safetensors) into a temporary folder renamed to ``out_dir`` at the end.

    An interrupted export never leaves half a folder. Raises FileExistsError if ``out_dir`` exists.
    """
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"out_dir={str(out)!r}: already exists; choose a new folder")

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return atomic_folder(out, fill)
