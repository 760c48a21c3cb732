"""A fingerprint of the base model an adapter was trained on.

Adapters silently drift from their base: loaded onto another checkpoint with the same shapes they
produce garbage without any error. The fingerprint records the architecture, the shapes of every
adapted layer, and a checksum plus a few robust statistics of the frozen weights there, so a load
onto a different base fails clearly while a load onto the same base in another dtype (bf16, or a
4-bit quantized copy) passes with a note.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import Tensor, nn

_SAMPLES = 4096  # elements sampled per weight for the checksum and statistics
_STAT_RTOL = 0.05  # relative tolerance on mean |w|: passes bf16 / NF4 copies, fails other checkpoints


def _dense_weight(layer: nn.Module) -> Tensor | None:
    deq = getattr(layer, "dequantize", None)
    if callable(deq) and not isinstance(layer, nn.Linear):
        return deq()
    w = getattr(layer, "weight", None)
    return w if isinstance(w, Tensor) and w.is_floating_point() else None


def _sample(w: Tensor) -> Tensor:
    flat = w.detach().reshape(-1)
    step = max(1, flat.numel() // _SAMPLES)
    return flat[::step][:_SAMPLES].float().cpu()


@dataclass(frozen=True)
class Fingerprint:
    architecture: str
    shapes: dict[str, list[int]]  # module name -> base weight shape (as the base stores it)
    checksum: str  # sha256 over the sampled weights in fp32: exact-copy check
    mean_abs: dict[str, float]  # module name -> mean |w| over the sample: tolerant check

    def to_json(self) -> dict[str, Any]:
        return {"architecture": self.architecture, "shapes": self.shapes, "checksum": self.checksum,
                "mean_abs": self.mean_abs}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Fingerprint":
        return cls(d["architecture"], d["shapes"], d["checksum"], d["mean_abs"])


def _architecture(model: nn.Module) -> str:
    archs = getattr(getattr(model, "config", None), "architectures", None)
    return archs[0] if archs else type(model).__name__


def compute(model: nn.Module, layers: Iterable[tuple[str, nn.Module]]) -> Fingerprint:
    """Fingerprint the base layers (name, base layer) of ``model``; unmerged weights expected."""
    digest = hashlib.sha256()
    shapes, stats = {}, {}
    for name, layer in sorted(layers, key=lambda t: t[0]):
        w = _dense_weight(layer)
        if w is None:
            continue
        s = _sample(w)
        shapes[name] = list(w.shape)
        stats[name] = float(s.abs().mean())
        digest.update(name.encode())
        digest.update(s.numpy().tobytes())
    return Fingerprint(_architecture(model), shapes, digest.hexdigest(), stats)


class BaseModelMismatch(ValueError):
    """The adapter was trained on a different base model."""


def check(saved: Fingerprint, current: Fingerprint) -> str | None:
    """Raise BaseModelMismatch when ``current`` is another base; return a note when merely not bit-identical."""
    if saved.shapes != current.shapes:
        diff = [n for n in saved.shapes if current.shapes.get(n) != saved.shapes[n]][:3]
        detail = ", ".join(f"{n}: saved {saved.shapes[n]} vs now {current.shapes.get(n)}" for n in diff)
        raise BaseModelMismatch(
            f"adapter was trained on a {saved.architecture} whose layer shapes differ from this "
            f"{current.architecture} ({detail or 'different set of layers'})")
    if saved.checksum == current.checksum:
        return None
    off = [n for n, v in saved.mean_abs.items()
           if abs(current.mean_abs.get(n, 0.0) - v) > _STAT_RTOL * max(abs(v), 1e-12)]
    if off:
        n = off[0]
        raise BaseModelMismatch(
            f"adapter was trained on a different base model: frozen weights differ in {len(off)} of "
            f"{len(saved.mean_abs)} adapted layers (e.g. {n}: mean |w| {saved.mean_abs[n]:.4g} when "
            f"saved, {current.mean_abs[n]:.4g} now). Load the base it was trained on, or pass "
            "check_base=False to load anyway")
    return ("base weights are not bit-identical to the ones the adapter was trained on "
            "(another dtype or a quantized copy?), but their statistics match")

