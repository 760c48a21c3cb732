"""The mixed-batch maths: each row of one batch equals that row alone with its adapter merged (PEFT the oracle)."""

from __future__ import annotations

import copy

import pytest
import torch

from slimtune.serve import MultiAdapterModel
from slimtune.serve.layer import NO_ADAPTER, RowPlan, grouped_lora_delta
from tests.conftest import tokens
from tests.serve.helpers import merged_oracle, three_adapters


@pytest.mark.parametrize("rows", [[2, 0, 2, 1], [1, 1, 1, 1], [NO_ADAPTER, 2, NO_ADAPTER, 2, 0, 2]],
                         ids=["uneven-groups", "one-adapter", "with-base-rows"])
def test_grouped_delta_is_the_lora_formula_per_row(rows):
    g = torch.Generator().manual_seed(0)
    S, R, d_in, d_out, N, T = 3, 5, 7, 6, len(rows), 3
    A, B = torch.randn(S, R, d_in, generator=g), torch.randn(S, d_out, R, generator=g)
    scale, x = torch.rand(S, generator=g), torch.randn(N, T, d_in, generator=g)
    plan = RowPlan.of(rows)
    got = grouped_lora_delta(x, A, B, scale, plan)
    used = [n for n, k in enumerate(rows) if k != NO_ADAPTER]
    assert got.shape == (len(used), T, d_out)
    assert (plan.used is None) == (len(used) == N)
    for i, n in enumerate(used):
        k = rows[n]
        want = scale[k] * (x[n] @ (B[k] @ A[k]).T)  # s x (B A)^T: the merged update
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-5)


def test_no_plan_when_no_row_uses_an_adapter():
    assert RowPlan.of([NO_ADAPTER, NO_ADAPTER]) is None


def test_mixed_batch_rows_equal_peft_merged_each(tmp_path):
    """Rows for three adapters (ranks 2/4/8, different targets; slimtune- and PEFT-written) and the base."""
    base, folders = three_adapters(tmp_path)
    served = MultiAdapterModel(copy.deepcopy(base))
    for name, folder in folders.items():
        served.load(name, folder)
    names = ["qv4", None, "all8", "peft2", "all8", "qv4"]
    ids = tokens(len(names), 10)
    got = served.forward(ids, names).logits
    for i, name in enumerate(names):
        oracle = base if name is None else merged_oracle(base, folders[name])
        with torch.no_grad():
            want = oracle(ids[i:i + 1]).logits[0]
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-5)
        if name is not None:  # the adapter really changes the output
            assert (got[i] - base(ids[i:i + 1]).logits[0]).abs().max() > 1e-2


def test_base_rows_are_the_base_bit_for_bit(tmp_path):
    base, folders = three_adapters(tmp_path)
    served = MultiAdapterModel(copy.deepcopy(base))
    served.load("all8", folders["all8"])
    ids = tokens(2, 8)
    with torch.no_grad():
        want = base(ids).logits
    assert torch.equal(served.forward(ids, [None, None]).logits, want)
    assert torch.equal(served.forward(ids).logits, want)


def test_unload_frees_the_slot_and_the_name(tmp_path):
    base, folders = three_adapters(tmp_path)
    served = MultiAdapterModel(copy.deepcopy(base))
    served.load("qv4", folders["qv4"])
    served.load("all8", folders["all8"])
    served.unload("qv4")
    with pytest.raises(KeyError, match="'qv4' is not loaded"):
        served.forward(tokens(1, 4), ["qv4"])
    served.load("peft2", folders["peft2"])  # reuses the freed slot: none of qv4's weights may remain
    ids = tokens(2, 8)
    got = served.forward(ids, ["peft2", "all8"]).logits
    for i, name in enumerate(["peft2", "all8"]):
        with torch.no_grad():
            want = merged_oracle(base, folders[name])(ids[i:i + 1]).logits[0]
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-5)
    assert NO_ADAPTER == -1
