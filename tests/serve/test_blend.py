"""Blending: the exact blend equals sum w_i (W_i - W0) by PEFT's own merge; SVD truncation reports its true error;
the result loads in PEFT and in the server; bad input exits 2 with one error line."""

from __future__ import annotations

import copy

import pytest
import torch
from typer.testing import CliRunner

from slimtune.cli import app
from slimtune.serve import AdapterRefused, MultiAdapterModel
from slimtune.serve.blend import BaseMismatch, blend, blend_factors
from tests.adapter_folders import tiny_llama_seeded
from tests.conftest import tiny_llama, tokens
from tests.serve.helpers import merged_oracle, peft_adapter, slimtune_adapter


def weight_deltas(base, merged):
    """Module name -> merged weight minus the base weight, for every Linear that changed."""
    sd0, sd1 = base.state_dict(), merged.state_dict()
    return {k[:-len(".weight")]: (sd1[k] - sd0[k]).double() for k in sd0 if k.endswith("proj.weight")}


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("blend")
    base = tiny_llama()
    a = slimtune_adapter(base, tmp / "a", 1, r=4, alpha=8, target_modules=("q_proj", "v_proj"))
    b = peft_adapter(base, tmp / "b", 2, r=6, lora_alpha=3, target_modules=["v_proj", "down_proj"])
    return base, a, b, tmp


def test_exact_blend_is_the_weighted_sum_of_updates(parts):
    base, a, b, tmp = parts
    report = blend([(str(a), 0.7), (str(b), -0.3)], tmp / "ab")
    da, db = weight_deltas(base, merged_oracle(base, a)), weight_deltas(base, merged_oracle(base, b))
    got = weight_deltas(base, merged_oracle(base, tmp / "ab"))  # PEFT reads the blend's own files
    for name in got:
        torch.testing.assert_close(got[name], 0.7 * da[name] - 0.3 * db[name], rtol=1e-5, atol=1e-6)
    assert max(report.errors.values()) == 0.0
    assert report.ranks["model.layers.0.self_attn.v_proj"] == 10 and report.ranks["model.layers.0.self_attn.q_proj"] == 4
    served = MultiAdapterModel(copy.deepcopy(base))
    served.load("ab", tmp / "ab")  # keeps a fingerprint: the server checks the base
    ids = tokens(1, 8)
    with torch.no_grad():
        want = merged_oracle(base, tmp / "ab")(ids).logits
    torch.testing.assert_close(served.forward(ids, ["ab"]).logits, want, rtol=1e-5, atol=1e-5)


def test_svd_truncation_reports_the_true_error(parts):
    base, a, b, tmp = parts
    report = blend([(str(a), 1.0), (str(b), 1.0)], tmp / "k3", rank=3)
    da, db = weight_deltas(base, merged_oracle(base, a)), weight_deltas(base, merged_oracle(base, b))
    got = weight_deltas(base, merged_oracle(base, tmp / "k3"))
    name = "model.layers.1.self_attn.v_proj"
    full = da[name] + db[name]
    true_err = float((got[name] - full).norm() / full.norm())
    assert report.ranks[name] == 3
    assert report.errors[name] == pytest.approx(true_err, rel=1e-4)
    s = torch.linalg.svdvals(full)  # Eckart-Young: the best rank-3 error is the tail of the singular values
    assert true_err == pytest.approx(float(s[3:].norm() / s.norm()), rel=1e-4)


def test_blend_factors_keeps_everything_at_full_rank():
    g = torch.Generator().manual_seed(0)
    f = [(torch.randn(2, 5, generator=g, dtype=torch.float64), torch.randn(4, 2, generator=g, dtype=torch.float64), 0.5)]
    A, B, err = blend_factors(f, rank=2)
    torch.testing.assert_close(B @ A, 0.5 * f[0][1] @ f[0][0])
    assert err == pytest.approx(0.0, abs=1e-12)


def test_refusals(parts):
    base, a, _, tmp = parts
    other = slimtune_adapter(tiny_llama_seeded(9), tmp / "other", 3, r=4)
    with pytest.raises(BaseMismatch, match="different base models"):
        blend([(str(a), 0.5), (str(other), 0.5)], tmp / "bad")
    dora = slimtune_adapter(base, tmp / "dora", 4, r=4, use_dora=True)
    with pytest.raises(AdapterRefused, match="use_dora=True"):
        blend([(str(dora), 1.0)], tmp / "bad2")
    assert not (tmp / "bad").exists() and not (tmp / "bad2").exists()


def test_cli_blend_and_its_errors(parts):
    _, a, b, tmp = parts
    runner = CliRunner()
    ok = runner.invoke(app, ["blend", f"{a}=0.5", f"{b}=0.5", "-o", str(tmp / "cli"), "--rank", "2"])
    assert ok.exit_code == 0 and "largest relative error" in ok.output and "rank 2" in ok.output
    for args, words in ((["blend", f"{a}", "-o", str(tmp / "x")], "give ADAPTER=WEIGHT"),
                        (["blend", f"{a}=abc", "-o", str(tmp / "x")], "give ADAPTER=WEIGHT"),
                        (["blend", f"{tmp}/none=1", "-o", str(tmp / "x")], "is not a folder"),
                        (["blend", f"{a}=1", "-o", str(tmp / "x"), "--rank", "0"], "--rank=0")):
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and words in r.output and r.output.count("error:") == 1, r.output
