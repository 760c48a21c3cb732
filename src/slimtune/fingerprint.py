"""A fingerprint of the base model an adapter was trained on (the rule and its figures: docs/fingerprint.md).

Adapters silently drift from their base: loaded onto another checkpoint with the same shapes they
produce garbage without any error. The fingerprint records, per adapted layer, the base weight's shape,
its storage format, the norm of a fixed sample of its values and a 16-value random projection (a sketch)
of that sample, plus a checksum of all samples. On load the sketches give each layer's relative
difference ||w_now - w_saved|| / ||w_saved||, compared with a threshold set by the coarser of the two
storage formats: a bf16, fp16 or NF4 copy of the right base loads with a note, another checkpoint (another
seed, or a fine-tune whose weights moved more than the format's rounding) is refused.
"""

from __future__ import annotations

import base64
import hashlib
import math
import struct
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import Tensor, nn

SAMPLES = 4096  # elements sampled per weight (strided, in storage order)
SKETCH_DIM = 16  # values in a layer's random projection: 16 float16 + 1 float32 norm = 36 bytes per layer
_SEED = b"slimtune-fingerprint-v2"  # the +-1 projection comes from SHAKE-128 of this: the same on every machine

# Largest relative difference accepted per storage format: 2-3x the worst per-layer figure measured on
# SmolLM2-135M and on tiny random models (benchmarks/fingerprint_errors.py, docs/fingerprint.md). A layer is
# refused above the larger of its saved and current format's bound. "fp32" is the float16 sketch's resolution.
BOUNDS: dict[str, float] = {"fp32": 2e-3, "fp16": 2e-3, "bf16": 5e-3, "nf4": 0.3, "nf4-coarse": 0.45}
NF4_FINE_BLOCK = 256  # NF4 with blocks up to this size is "nf4"; larger blocks round more ("nf4-coarse")
_FORMAT_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "nf4": "NF4 (4-bit)",
                 "nf4-coarse": f"NF4 (4-bit, blocks over {NF4_FINE_BLOCK})"}
_STAT_RTOL = 0.05  # version-1 fingerprints only: relative tolerance on mean |w|


class BaseModelMismatch(ValueError):
    """The adapter was trained on a different base model."""


def dense_weight(layer: nn.Module) -> tuple[Tensor, bool] | None:
    """(weight as the layer computes with it, whether it is a dequantized 4-bit weight), or None."""
    deq = getattr(layer, "dequantize", None)
    if callable(deq) and not isinstance(layer, nn.Linear):
        return deq(), True
    w = getattr(layer, "weight", None)
    return (w, False) if isinstance(w, Tensor) and w.is_floating_point() else None


def sample(w: Tensor) -> Tensor:
    """(min(numel, SAMPLES),) float32: every ``numel // SAMPLES``-th element of ``w`` in storage order."""
    flat = w.detach().reshape(-1)
    step = max(1, flat.numel() // SAMPLES)
    return flat[::step][:SAMPLES].float().cpu()


def storage_format(w: Tensor, quantized: bool, s: Tensor, block_size: int = 64) -> str:
    """"nf4" (or "nf4-coarse") for a 4-bit layer; else the coarsest of bf16 / fp16 / fp32 that holds the
    sample ``s`` exactly (so a bf16 checkpoint upcast to float32 counts as bf16)."""
    if quantized:
        return "nf4" if block_size <= NF4_FINE_BLOCK else "nf4-coarse"
    if w.dtype == torch.bfloat16 or torch.equal(s.bfloat16().float(), s):
        return "bf16"
    if w.dtype == torch.float16 or torch.equal(s.half().float(), s):
        return "fp16"
    return "fp32"


_projection_cache: list[Tensor] = []


def projection() -> Tensor:
    """(SKETCH_DIM, SAMPLES) float64 matrix of +-1 from SHAKE-128 of a fixed seed."""
    if not _projection_cache:
        raw = hashlib.shake_128(_SEED).digest(SKETCH_DIM * SAMPLES // 8)
        bits = torch.frombuffer(bytearray(raw), dtype=torch.uint8)[:, None] >> torch.arange(8) & 1
        _projection_cache.append((bits.reshape(SKETCH_DIM, SAMPLES).double() * 2 - 1))
    return _projection_cache[0]


def sketch(s: Tensor) -> str:
    """Base64 of float32 ||s|| then float16 R s / (sqrt(k) ||s||), R = projection()[:, :len(s)].

    E ||R e||^2 / k = ||e||^2 for any vector e, so decoded sketches estimate distances between samples.
    """
    x = s.double()
    norm = float(x.norm())
    z = projection()[:, : x.numel()] @ x / (math.sqrt(SKETCH_DIM) * max(norm, 1e-30))  # (k,)
    return base64.b64encode(struct.pack("<f", norm) + z.half().numpy().tobytes()).decode("ascii")


def decode_sketch(blob: str, where: str = "sketch") -> tuple[Tensor, float]:
    """((SKETCH_DIM,) float64 projection R s / sqrt(k), ||s||) from a sketch. Raises ValueError if malformed."""
    try:
        raw = base64.b64decode(blob.encode("ascii"), validate=True)
    except (ValueError, AttributeError) as e:
        raise ValueError(f"slimtune_fingerprint {where}={blob!r}: not base64 ({e})") from None
    if len(raw) != 4 + 2 * SKETCH_DIM:
        raise ValueError(f"slimtune_fingerprint {where}: {len(raw)} bytes, expected {4 + 2 * SKETCH_DIM}")
    (norm,) = struct.unpack("<f", raw[:4])
    z = torch.frombuffer(bytearray(raw[4:]), dtype=torch.float16).double()
    if not math.isfinite(norm) or not torch.isfinite(z).all():
        raise ValueError(f"slimtune_fingerprint {where}: non-finite values")
    return z * norm, norm


def relative_difference(saved: str, current: str) -> float:
    """||w_now - w_saved|| / ||w_saved|| estimated from two sketches (inf when the saved norm is 0)."""
    (a, ref), (b, _) = decode_sketch(saved), decode_sketch(current)
    diff = float((b - a).norm())  # estimates ||s_now - s_saved||; ref is ||s_saved|| itself, not an estimate
    return diff / ref if ref > 0 else (0.0 if diff == 0 else math.inf)


@dataclass(frozen=True)
class Fingerprint:
    """Version 2 has ``formats`` and ``sketches``; version 1 (older files) only ``mean_abs``."""

    architecture: str
    shapes: dict[str, list[int]]  # module name -> base weight shape (as the base stores it)
    checksum: str  # sha256 over the sampled weights in fp32: exact-copy check
    mean_abs: dict[str, float] = field(default_factory=dict)  # mean |w| over the sample (version-1 check)
    formats: dict[str, str] = field(default_factory=dict)  # module name -> key of BOUNDS
    sketches: dict[str, str] = field(default_factory=dict)  # module name -> sketch()

    def to_json(self) -> dict[str, Any]:
        return {"version": 2, "architecture": self.architecture, "checksum": self.checksum,
                "layers": {n: [s, self.formats[n], self.sketches[n]] for n, s in self.shapes.items()}}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Fingerprint":
        """Read either version. Raises ValueError naming the field for a malformed fingerprint."""
        try:
            if "layers" not in d:  # version 1
                return cls(str(d["architecture"]), dict(d["shapes"]), str(d["checksum"]),
                           {n: float(v) for n, v in d["mean_abs"].items()})
            shapes, formats, sketches = {}, {}, {}
            for name, entry in d["layers"].items():
                if not isinstance(entry, list) or len(entry) != 3:
                    raise ValueError(f"layers[{name!r}]={entry!r}: must be [shape, format, sketch]")
                shape, fmt, blob = entry
                if fmt not in BOUNDS:
                    raise ValueError(f"layers[{name!r}] format={fmt!r}: must be one of {', '.join(BOUNDS)}")
                decode_sketch(blob, f"layers[{name!r}]")
                shapes[name], formats[name], sketches[name] = [int(x) for x in shape], fmt, blob
            return cls(str(d["architecture"]), shapes, str(d["checksum"]), {}, formats, sketches)
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"slimtune_fingerprint is malformed ({type(e).__name__}: {e}); expected "
                             "{'architecture', 'checksum', 'layers': {name: [shape, format, sketch]}}") from None


def _architecture(model: nn.Module) -> str:
    archs = getattr(getattr(model, "config", None), "architectures", None)
    return archs[0] if archs else type(model).__name__


def compute(model: nn.Module, layers: Iterable[tuple[str, nn.Module]]) -> Fingerprint:
    """Fingerprint the base layers (name, base layer) of ``model``; unmerged weights expected."""
    digest = hashlib.sha256()
    shapes, stats, formats, sketches = {}, {}, {}, {}
    for name, layer in sorted(layers, key=lambda t: t[0]):
        found = dense_weight(layer)
        if found is None:
            continue
        w, quantized = found
        s = sample(w)
        shapes[name] = list(w.shape)
        stats[name] = float(s.abs().mean())
        formats[name] = storage_format(w, quantized, s, getattr(layer, "block_size", 64))
        sketches[name] = sketch(s)
        digest.update(name.encode())
        digest.update(s.numpy().tobytes())
    return Fingerprint(_architecture(model), shapes, digest.hexdigest(), stats, formats, sketches)


def _check_shapes(saved: Fingerprint, current: Fingerprint) -> None:
    if saved.shapes != current.shapes:
        diff = [n for n in saved.shapes if current.shapes.get(n) != saved.shapes[n]][:3]
        detail = ", ".join(f"{n}: saved {saved.shapes[n]} vs now {current.shapes.get(n)}" for n in diff)
        raise BaseModelMismatch(
            f"adapter was trained on a {saved.architecture} whose layer shapes differ from this "
            f"{current.architecture} ({detail or 'different set of layers'})")


def _check_v1(saved: Fingerprint, current: Fingerprint) -> str:
    off = [n for n, v in saved.mean_abs.items()
           if abs(current.mean_abs.get(n, 0.0) - v) > _STAT_RTOL * max(abs(v), 1e-12)]
    if off:
        n = off[0]
        raise BaseModelMismatch(
            f"adapter was trained on a different base model: frozen weights differ in {len(off)} of "
            f"{len(saved.mean_abs)} adapted layers (e.g. {n}: mean |w| {saved.mean_abs[n]:.4g} when "
            f"saved, {current.mean_abs[n]:.4g} now). Load the base it was trained on, or pass "
            "check_base=False to load anyway")
    return ("base weights are not bit-identical to the ones the adapter was trained on, and the adapter has an "
            "old (version 1) fingerprint that only compares mean |w| per layer within 5%, which cannot tell "
            "another checkpoint of the same architecture apart; save the adapter again for the exact check")


def check(saved: Fingerprint, current: Fingerprint) -> str | None:
    """None for the same base weights; a note for a lower-precision copy of them (bf16, fp16, NF4).

    Raises BaseModelMismatch when the shapes differ or any layer's relative difference exceeds the bound
    of the coarser of its saved and current storage formats (BOUNDS), naming the worst layers.
    """
    _check_shapes(saved, current)
    if saved.checksum == current.checksum:
        return None
    if not saved.sketches:
        return _check_v1(saved, current)
    rows = []  # (difference / bound, name, difference, bound, saved format, current format)
    for name, blob in saved.sketches.items():
        fmts = (saved.formats[name], current.formats[name])
        bound = max(BOUNDS[f] for f in fmts)
        diff = relative_difference(blob, current.sketches[name])
        rows.append((diff / bound, name, diff, bound, *fmts))
    rows.sort(reverse=True)
    off = [r for r in rows if r[0] > 1]
    if off:
        worst = "; ".join(f"{n}: {d:.3g} > {b:.3g} (saved {fs}, now {fc})" for _, n, d, b, fs, fc in off[:3])
        raise BaseModelMismatch(
            f"adapter was trained on a different base model: in {len(off)} of {len(rows)} adapted layers the "
            f"frozen weights differ by more than their storage format's rounding (relative difference "
            f"||w_now - w_saved|| / ||w_saved|| > threshold; worst: {worst}). Load the base it was trained "
            "on, or pass check_base=False to load anyway")
    _, name, diff, bound, fs, fc = max(rows, key=lambda r: (r[3], r[2]))
    coarse = fs if BOUNDS[fs] >= BOUNDS[fc] else fc
    return (f"base weights are not bit-identical to the ones the adapter was trained on (saved from {fs}, now "
            f"{fc} in e.g. {name}), but every layer is within {_FORMAT_NAMES[coarse]} rounding (largest relative "
            f"difference {rows[0][2]:.3g}, threshold {bound:.3g}); a different checkpoint whose weights differ "
            f"from the trained-on base by less than ~{100 * bound:.2g}% relative (e.g. a light fine-tune) cannot be "
            "told apart from a copy at this precision")
