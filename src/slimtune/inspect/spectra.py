"""Pure maths on low-rank updates dW = s * B @ A, from the (d, r) factors, never forming the d x d matrix.

B (d_out, r) = Q_B R_B and A^T (d_in, r) = Q_A R_A (reduced QR), so dW = s * Q_B (R_B R_A^T) Q_A^T: the
singular values of dW are s times those of the r x r core, and its singular vectors are Q_B U and Q_A V.
Cost O((d_out + d_in) r^2) instead of O(d_out d_in min(d_out, d_in)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

ENERGY_LEVELS = (0.90, 0.95, 0.99)  # the energy shares reported and marked on the spectra


@dataclass(frozen=True)
class FactoredSVD:
    """dW = U diag(S) Vh with U (d_out, r), S (r,) descending, Vh (r, d_in); float64 unless asked otherwise."""

    U: Tensor
    S: Tensor
    Vh: Tensor


def factored_svd(A: Tensor, B: Tensor, scale: float) -> FactoredSVD:
    """The thin SVD of s * B @ A without forming it. A: (r, d_in), B: (d_out, r).

    Computed in float64 (the core is tiny; fp32 would lose the small singular values that decide the energy
    ranks). Raises ValueError when the shapes do not chain.
    """
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
        raise ValueError(f"factors do not chain: A {tuple(A.shape)} must be (r, d_in) and B {tuple(B.shape)} "
                         "(d_out, r) with the same r")
    Qb, Rb = torch.linalg.qr(B.detach().double())  # (d_out, r), (r, r)
    Qa, Ra = torch.linalg.qr(A.detach().double().T)  # (d_in, r), (r, r)
    Uc, S, Vhc = torch.linalg.svd(Rb @ Ra.T)  # the r x r core
    return FactoredSVD(Qb @ Uc, S * abs(scale), (Qa @ Vhc.T).T * math.copysign(1.0, scale))


def singular_values(A: Tensor, B: Tensor, scale: float) -> Tensor:
    """(r,) singular values of s * B @ A, descending, float64."""
    return factored_svd(A, B, scale).S


def frobenius(S: Tensor) -> float:
    """||dW||_F from its singular values."""
    return float(torch.linalg.vector_norm(S))


def stable_rank(S: Tensor) -> float:
    """||dW||_F^2 / ||dW||_2^2 (Rudelson & Vershynin 2007): between 1 and the rank; 0 for dW = 0."""
    top = float(S.max()) if S.numel() else 0.0
    return float((S ** 2).sum()) / top ** 2 if top > 0 else 0.0


def effective_rank(S: Tensor) -> float:
    """exp of the entropy of p_i = s_i / sum s_j (Roy & Vetterli 2007): 1 for one direction, r for a flat
    spectrum; 0 for dW = 0."""
    total = float(S.sum())
    if total <= 0:
        return 0.0
    p = S[S > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


def energy_rank(S: Tensor, fraction: float) -> int:
    """The smallest k with sum_{i<=k} s_i^2 >= fraction * ||dW||_F^2 (0 for dW = 0).

    Raises ValueError unless 0 < fraction <= 1.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"energy={fraction!r}: must be in (0, 1], the share of ||dW||_F^2 to keep")
    energy = S.double() ** 2
    total = float(energy.sum())
    if total <= 0:
        return 0
    cumulative = torch.cumsum(energy, 0) / total
    # a tolerance so that fraction=1.0 stops at the true rank, not at round-off in the zero tail
    return min(int((cumulative < fraction - 1e-12).sum()) + 1, S.numel())


def energy_kept(S: Tensor, k: int) -> float:
    """sum_{i<=k} s_i^2 / sum s_i^2: the share of ||dW||_F^2 a rank-k truncation keeps (1.0 for dW = 0)."""
    total = float((S.double() ** 2).sum())
    return float((S[:k].double() ** 2).sum()) / total if total > 0 else 1.0


def pooled_energy(parts: list[tuple[float, float]]) -> float:
    """The share of sum ||dW_i||_F^2 kept over several modules, from each (share kept, ||dW_i||_F); 1.0 when
    every norm is 0."""
    total = sum(norm ** 2 for _, norm in parts)
    return sum(share * norm ** 2 for share, norm in parts) / total if total > 0 else 1.0


def balanced_factors(svd: FactoredSVD, k: int, scale: float) -> tuple[Tensor, Tensor]:
    """(A', B') of rank k with scale * B' @ A' = U_k S_k Vh_k, the best rank-k approximation (Eckart-Young).

    Balanced: sqrt(S_k / scale) on each side, so A' and B' have equal norms (as a trained LoRA's tend to).
    Returns A' (k, d_in), B' (d_out, k) in float64. Raises ValueError unless 1 <= k and scale > 0.
    """
    if k < 1:
        raise ValueError(f"rank={k!r}: must be a positive integer")
    if scale <= 0:
        raise ValueError(f"scale={scale!r}: must be positive")
    root = torch.sqrt(svd.S[:k] / scale)  # (k,)
    k_eff = root.numel()  # k may exceed the factors' rank: pad with zero directions
    A = torch.zeros(k, svd.Vh.shape[1], dtype=svd.Vh.dtype)
    B = torch.zeros(svd.U.shape[0], k, dtype=svd.U.dtype)
    A[:k_eff] = root[:, None] * svd.Vh[:k_eff]
    B[:, :k_eff] = svd.U[:, :k_eff] * root[None, :]
    return A, B


def lowrank_svd(M: Tensor, k: int, exact_below: int = 1024, oversample: int = 10, niter: int = 4) -> FactoredSVD:
    """Top-k SVD of a dense (d_out, d_in) matrix: exact (torch.linalg.svd) when min(d) < ``exact_below``,
    else randomized (Halko, Martinsson & Tropp 2011, ``torch.svd_lowrank``) with ``oversample`` extra
    directions and ``niter`` power iterations. Float32 in, float32 out (a big layer in float64 would double
    the memory for no gain at these ranks). Raises ValueError for k < 1."""
    if k < 1:
        raise ValueError(f"rank={k!r}: must be a positive integer")
    M = M.detach().float()
    if not uses_randomized(tuple(M.shape), k, exact_below, oversample):
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        return FactoredSVD(U[:, :k], S[:k], Vh[:k])
    with torch.random.fork_rng(devices=[]):  # a fixed sketch: the same file from the same inputs, RNG untouched
        torch.manual_seed(0)
        U, S, V = torch.svd_lowrank(M, q=k + oversample, niter=niter)
    return FactoredSVD(U[:, :k], S[:k], V[:, :k].T)


def uses_randomized(shape: tuple[int, int], k: int, exact_below: int = 1024, oversample: int = 10) -> bool:
    """Whether :func:`lowrank_svd` sketches (True) or computes the exact SVD of a ``shape`` matrix at rank k."""
    return min(shape) >= exact_below and k + oversample < min(shape)
