"""The low-rank maths against torch.linalg on the formed d_out x d_in matrix (the oracle), in float64."""

import math

import pytest
import torch

from slimtune.inspect import spectra


def factors(d_out=48, d_in=40, r=6, true_rank=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, d_in, generator=g, dtype=torch.float64)
    B = torch.randn(d_out, r, generator=g, dtype=torch.float64)
    if true_rank is not None:  # B's columns span only true_rank directions
        B = B[:, :true_rank] @ torch.randn(true_rank, r, generator=g, dtype=torch.float64)
    return A, B


@pytest.mark.parametrize("shape", [(48, 40, 6), (40, 96, 8), (7, 300, 4)])
def test_factored_singular_values_match_the_dense_svd(shape):
    d_out, d_in, r = shape
    A, B = factors(d_out, d_in, r)
    dense = 2.5 * B @ A
    expected = torch.linalg.svdvals(dense)[:r]
    got = spectra.singular_values(A, B, 2.5)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    assert spectra.frobenius(got) == pytest.approx(float(torch.linalg.matrix_norm(dense)), rel=1e-12)


def test_factored_svd_reconstructs_the_update():
    A, B = factors()
    svd = spectra.factored_svd(A, B, 0.5)
    torch.testing.assert_close(svd.U @ torch.diag(svd.S) @ svd.Vh, 0.5 * B @ A, rtol=0, atol=1e-10)
    torch.testing.assert_close(svd.U.T @ svd.U, torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-10)


def test_ranks_follow_their_definitions_on_the_dense_spectrum():
    A, B = factors(true_rank=3)
    s = torch.linalg.svdvals(B @ A)  # full dense spectrum: 40 values, 3 nonzero
    got = spectra.singular_values(A, B, 1.0)
    assert spectra.stable_rank(got) == pytest.approx(float((s ** 2).sum() / s[0] ** 2), rel=1e-9)
    p = s[s > 1e-9 * s[0]] / s.sum()
    assert spectra.effective_rank(got) == pytest.approx(math.exp(float(-(p * p.log()).sum())), rel=1e-6)
    cumulative = torch.cumsum(s ** 2, 0) / (s ** 2).sum()
    for f in (0.5, 0.9, 0.99):
        assert spectra.energy_rank(got, f) == int((cumulative < f).sum()) + 1
    assert spectra.energy_rank(got, 1.0) == 3  # the true rank, not the factors' 6
    assert torch.linalg.matrix_rank(B @ A) == 3


def test_zero_update_has_zero_ranks():
    A, B = factors()
    S = spectra.singular_values(A, torch.zeros_like(B), 1.0)  # a LoRA before training: B = 0
    assert (spectra.frobenius(S), spectra.stable_rank(S), spectra.effective_rank(S), spectra.energy_rank(S, 0.9)) \
        == (0.0, 0.0, 0.0, 0)


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
def test_energy_outside_zero_one_is_refused(bad):
    with pytest.raises(ValueError, match=rf"energy={bad!r}: must be in \(0, 1\]"):
        spectra.energy_rank(torch.ones(3), bad)


@pytest.mark.parametrize("k", [1, 3, 6, 9])
def test_balanced_truncation_is_the_best_rank_k_approximation(k):
    A, B = factors()
    dense = 0.7 * B @ A
    A2, B2 = spectra.balanced_factors(spectra.factored_svd(A, B, 0.7), k, 2.0)
    assert A2.shape == (k, 40) and B2.shape == (48, k)
    s = torch.linalg.svdvals(dense)
    # Eckart-Young: ||dW - dW_k||_F^2 = sum of the discarded s_i^2
    err = torch.linalg.matrix_norm(dense - 2.0 * B2 @ A2) ** 2
    assert float(err) == pytest.approx(float((s[k:] ** 2).sum()), abs=1e-9)
    assert float(torch.linalg.matrix_norm(A2)) == pytest.approx(float(torch.linalg.matrix_norm(B2)), rel=1e-9)


def test_energy_kept_is_the_truncations_share_of_the_squared_norm():
    A, B = factors()
    svd = spectra.factored_svd(A, B, 1.0)
    A2, B2 = spectra.balanced_factors(svd, 2, 1.0)
    total = float(torch.linalg.matrix_norm(B @ A) ** 2)
    assert spectra.energy_kept(svd.S, 2) == pytest.approx(float(torch.linalg.matrix_norm(B2 @ A2) ** 2) / total)


def test_randomized_svd_of_a_big_layer_matches_the_exact_one():
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(600, 200, generator=g))
    V, _ = torch.linalg.qr(torch.randn(500, 200, generator=g))
    M = (U * 0.8 ** torch.arange(200.0)) @ V.T  # decaying spectrum, as a fine-tune's dW has
    exact = spectra.lowrank_svd(M, 8, exact_below=10_000)
    sketch = spectra.lowrank_svd(M, 8, exact_below=100)
    assert spectra.uses_randomized((600, 500), 8, 100) and not spectra.uses_randomized((600, 500), 8, 10_000)
    torch.testing.assert_close(sketch.S, exact.S, rtol=1e-4, atol=1e-6)
    residual = lambda s: float(torch.linalg.matrix_norm(M - s.U @ torch.diag(s.S) @ s.Vh))
    assert residual(sketch) == pytest.approx(residual(exact), rel=1e-3)
    assert torch.equal(spectra.lowrank_svd(M, 8, exact_below=100).S, sketch.S)  # seeded: the same twice


def test_factors_that_do_not_chain_are_named():
    with pytest.raises(ValueError, match=r"factors do not chain: A \(4, 10\)"):
        spectra.factored_svd(torch.ones(4, 10), torch.ones(8, 3), 1.0)
