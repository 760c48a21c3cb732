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


# -- DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation") ----------------------
#
# W' = m * V / ||V||_c with V = W0 + s B A, the norm taken per output row (the paper's column norm of
# the (d_in, d_out) matrix). Section 4.3 treats ||V|| as a constant in backward, so it is computed
# under no_grad. The rows are written out (d_out, d_in) here whatever the base's storage layout.

def dora_norm(W0: Tensor, A: Tensor, B: Tensor, scale: float) -> Tensor:
    """||W0 + s B A|| per output row, in fp32, computed densely. W0: (d_out, d_in) -> (d_out,)."""
    return torch.linalg.vector_norm(W0.float() + (B.float() @ A.float()) * scale, dim=1)


def dora_norm_factored(w0_sq: Tensor, w0_at: Tensor, A: Tensor, B: Tensor, scale: float) -> Tensor:
    """The same norm without forming W0 + s B A (d_out x d_in): only (d_out, r) products.

    ||w_i + s b_i A||^2 = ||w_i||^2 + 2 s b_i . (W0 A^T)_i + s^2 b_i (A A^T) b_i^T
    w0_sq: (d_out,) squared row norms of W0; w0_at: (d_out, r) = W0 @ A^T; A: (r, d_in); B: (d_out, r).
    """
    B32 = B.float()
    gram = A.float() @ A.float().T  # (r, r)
    sq = w0_sq + 2.0 * scale * (B32 * w0_at).sum(1) + scale * scale * ((B32 @ gram) * B32).sum(1)
    return sq.clamp_min(0.0).sqrt()


def dora_merged(W0: Tensor, A: Tensor, B: Tensor, scale: float, magnitude: Tensor) -> tuple[Tensor, Tensor]:
    """(W', norm): W' = m / ||V|| * V with V = W0 + s B A, in W0's dtype; norm kept for unmerging.

    W0: (d_out, d_in); magnitude: (d_out,).
    """
    V = W0.float() + (B.float() @ A.float()) * scale  # (d_out, d_in)
    norm = torch.linalg.vector_norm(V, dim=1)
    return ((magnitude.float() / norm)[:, None] * V).to(W0.dtype), norm


def dora_unmerged(W: Tensor, A: Tensor, B: Tensor, scale: float, magnitude: Tensor, norm: Tensor) -> Tensor:
    """Inverse of ``dora_merged`` given the norm it returned: W0 = W * ||V|| / m - s B A."""
    W0 = W.float() * (norm / magnitude.float())[:, None] - (B.float() @ A.float()) * scale
    return W0.to(W.dtype)


# -- initializations that move the base's principal part into the adapter ----------------------

def pissa_split(W0: Tensor, r: int, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """PiSSA (Meng et al. 2024): (A, B, W_res) with s B A the top-r SVD part of W0, W_res the rest.

    W0 = U S V^T; A = sqrt(S_r / s) V_r^T (r, d_in), B = U_r sqrt(S_r / s) (d_out, r), so that
    W_res + s B A = W0. Computed in fp32, exact SVD (as PEFT's ``init_lora_weights="pissa"``).
    """
    U, S, Vh = torch.linalg.svd(W0.float(), full_matrices=False)
    root = torch.sqrt(S[:r] / scale)  # (r,)
    A = root[:, None] * Vh[:r]  # (r, d_in)
    B = U[:, :r] * root[None, :]  # (d_out, r)
    return A, B, W0.float() - scale * (B @ A)


def olora_split(W0: Tensor, r: int, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """OLoRA (Buyukakyuz 2024): W0 = Q R; A = R[:r] (r, d_in), B = Q[:, :r] (d_out, r), residual kept.

    As PEFT's ``init_lora_weights="olora"``: W_res = W0 - s B A, so W_res + s B A = W0.
    """
    Q, R = torch.linalg.qr(W0.float())
    A, B = R[:r].contiguous(), Q[:, :r].contiguous()
    return A, B, W0.float() - scale * (B @ A)
