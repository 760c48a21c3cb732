"""Pure delta-weight and merge functions, used by the layers, the exporter and the tests.

LoRA (Hu et al. 2021, eq. 3): W' = W0 + s * B @ A, with A (r, d_in), B (d_out, r), s = alpha / r
(rsLoRA, Kalajdzievski 2023: s = alpha / sqrt(r)). All deltas are computed in fp32 and the sum is
cast back to the weight's dtype, so a bf16 base merges without accumulating bf16 round-off twice.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def lora_scale(alpha: float, r: int, use_rslora: bool = False) -> float:
    """s = alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def linear_delta(A: Tensor, B: Tensor, scale: float, fan_in_fan_out: bool = False) -> Tensor:
    """s * B @ A in fp32.

    A: (r, d_in), B: (d_out, r) -> (d_out, d_in); transposed to (d_in, d_out) when the base
    stores its weight fan-in first (transformers' GPT-2 ``Conv1D``).
    """
    delta = (B.float() @ A.float()) * scale  # (d_out, d_in)
    return delta.T if fan_in_fan_out else delta


def embedding_delta(A: Tensor, B: Tensor, scale: float) -> Tensor:
    """s * (B @ A)^T in fp32. A: (r, num_embeddings), B: (dim, r) -> (num_embeddings, dim)."""
    return ((B.float() @ A.float()) * scale).T


def conv_delta(A: Tensor, B: Tensor, scale: float) -> Tensor:
    """The conv kernel equivalent to conv(B, 1x1) after conv(A, k x k), in fp32.

    A: (r, c_in, *k), B: (c_out, r, 1, ...) -> (c_out, c_in, *k).
    """
    A32, B32 = A.float(), B.float()
    if all(k == 1 for k in A.shape[2:]):
        delta = (B32.flatten(1) @ A32.flatten(1)).view(B.shape[0], A.shape[1], *A.shape[2:])
    else:
        conv = F.conv1d if A.dim() == 3 else F.conv2d
        # Treat A's input channels as a batch: (c_in, r, *k) conv (c_out, r, 1..) -> (c_in, c_out, *k)
        delta = conv(A32.transpose(0, 1), B32).transpose(0, 1)
    return delta * scale


def merge_into(weight: Tensor, delta: Tensor) -> Tensor:
    """W0 + delta, computed in fp32, returned in W0's dtype."""
    return (weight.float() + delta.to(weight.device)).to(weight.dtype)


def unmerge_from(weight: Tensor, delta: Tensor) -> Tensor:
    """W - delta, computed in fp32, returned in W's dtype."""
    return (weight.float() - delta.to(weight.device)).to(weight.dtype)


def merge_state_dict(base: dict[str, Tensor], deltas: dict[str, Tensor]) -> dict[str, Tensor]:
    """A new state dict with each delta (keyed by the weight's name) added; inputs untouched."""
    missing = sorted(set(deltas) - set(base))
    if missing:
        raise KeyError(f"deltas name weights the base state dict lacks: {missing[:5]}")
    return {k: merge_into(v, deltas[k]) if k in deltas else v for k, v in base.items()}


def is_finite(t: Tensor) -> bool:
    return bool(torch.isfinite(t).all())
