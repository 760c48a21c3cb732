"""The mixed-batch maths: each row of one batch equals that row alone with its adapter merged (PEFT the oracle)."""

from __future__ import annotations

import copy

import pytest
import torch

from slimtune.serve import MultiAdapterModel
from slimtune.serve.layer import NO_ADAPTER, RowPlan, grouped_lora_delta
from tests.conftest import tokens
from tests.serve.helpers import bottleneck_adapter, bottleneck_oracle, merged_oracle, three_adapters


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


def dora_world(tmp_path, build):
    """(base, {name: folder}): DoRA adapters (slimtune- and PEFT-written, different ranks and targets) beside a
    plain LoRA, on ``build()``'s model; GPT-2's Conv1D layers carry a bias, which DoRA leaves unscaled."""
    from tests.serve.helpers import peft_adapter, slimtune_adapter

    base = build()
    linear = ["c_attn", "c_proj"] if "GPT2" in type(base).__name__ else ["q_proj", "v_proj", "down_proj"]
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # GPT-2 starts with zero biases: make them count
        for name, p in base.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    folders = {
        "dora4": slimtune_adapter(base, tmp_path / "dora4", 1, std=0.3, r=4, alpha=8, use_dora=True,
                                  target_modules=tuple(linear)),
        "pdora2": peft_adapter(base, tmp_path / "pdora2", 2, std=0.3, r=2, lora_alpha=4, use_dora=True,
                               target_modules=linear[:1]),
        "lora8": slimtune_adapter(base, tmp_path / "lora8", 3, std=0.3, r=8, target_modules=tuple(linear[-1:])),
    }
    return base, folders


@pytest.mark.parametrize("build", ["tiny_llama", "tiny_gpt2"])
def test_dora_rows_share_the_batch_and_equal_peft_merged_each(tmp_path, build):
    """DoRA served batched: each row equals PEFT's DoRA merged alone (1e-5), beside LoRA and base rows."""
    import tests.conftest as conftest

    base, folders = dora_world(tmp_path, getattr(conftest, build))
    served = MultiAdapterModel(copy.deepcopy(base))
    for name, folder in folders.items():
        served.load(name, folder)
    names = ["dora4", None, "lora8", "pdora2", "dora4", "lora8", "pdora2"]
    ids = tokens(len(names), 9)
    got = served.forward(ids, names).logits
    with torch.no_grad():
        plain = base(ids).logits
        for i, name in enumerate(names):
            oracle = base if name is None else merged_oracle(base, folders[name])
            torch.testing.assert_close(got[i], oracle(ids[i:i + 1]).logits[0], rtol=1e-5, atol=1e-5)
            if name is not None:
                assert (got[i] - plain[i]).abs().max() > 1e-2
    served.unload("dora4")  # its slot back to the base (c = 1, A = B = 0), then reused by a plain LoRA
    assert served.load("again", folders["lora8"]) and served.slots["again"] == 0
    with torch.no_grad():
        want = merged_oracle(base, folders["lora8"])(ids[:1]).logits[0]
    torch.testing.assert_close(served.forward(ids[:2], ["again", "pdora2"]).logits[0], want, rtol=1e-5, atol=1e-5)


def test_bottleneck_rows_share_the_batch_and_equal_the_formula_each(tmp_path):
    """Bottleneck adapters (sizes 4 and 6, relu and gelu, attention+mlp or mlp only) beside LoRA, DoRA and base
    rows: each row equals h + s up(act(down(h))) applied alone (forward hooks on the plain base)."""
    from tests.conftest import tiny_llama

    base = tiny_llama()
    folders = {"b4": bottleneck_adapter(base, tmp_path / "b4", 10, size=4, scale=0.5),
               "b6": bottleneck_adapter(base, tmp_path / "b6", 11, size=6, nonlinearity="gelu", positions=("mlp",))}
    _, more = dora_world(tmp_path / "more", lambda: base)
    folders |= {"dora4": more["dora4"], "lora8": more["lora8"]}
    served = MultiAdapterModel(copy.deepcopy(base))
    for name, folder in folders.items():
        served.load(name, folder)
    names = ["b4", "lora8", "b6", None, "dora4", "b4", "b6"]
    ids = tokens(len(names), 9)
    got = served.forward(ids, names).logits
    with torch.no_grad():
        for i, name in enumerate(names):
            if name is None:
                oracle = base
            elif name.startswith("b"):
                oracle = bottleneck_oracle(base, folders[name])
            else:
                oracle = merged_oracle(base, folders[name])
            torch.testing.assert_close(got[i], oracle(ids[i:i + 1]).logits[0], rtol=1e-5, atol=1e-5)
            if name is not None:
                assert (got[i] - base(ids[i:i + 1]).logits[0]).abs().max() > 1e-2
    served.unload("b4")
    with torch.no_grad():
        want = bottleneck_oracle(base, folders["b6"])(ids[2:3]).logits[0]
    torch.testing.assert_close(served.forward(ids[:3], [None, None, "b6"]).logits[2], want, rtol=1e-5, atol=1e-5)
