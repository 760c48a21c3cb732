"""Estimate vs measured, component by component, within 5% (issue #3, item 4)."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from slimtune.memory.compare import measure_against_estimate  # noqa: E402
from slimtune.memory.spec import Method, Precision, Workload  # noqa: E402

from .conftest import TINY  # noqa: E402

TOLERANCE = 0.05
KEYS = ("weights", "gradients", "optimizer", "activations", "total")


def assert_close(ref, method: Method, workload: Workload, precision: Precision = Precision()) -> None:
    est, meas = measure_against_estimate(ref, method, precision, workload)
    e, m = est.as_dict(), meas.as_dict()
    for key in KEYS:
        err = abs(e[key] - m[key]) / max(m[key], 1)
        assert err <= TOLERANCE, f"{key}: estimated {e[key]:,}, measured {m[key]:,} ({err:.1%}); {method}, {workload}"
    assert est.trainable_params == meas.trainable_params


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("method", ["full", "freeze", "lora"])
@pytest.mark.parametrize("batch, seq", [(1, 16), (3, 40)])
@pytest.mark.parametrize("ckpt", [False, True], ids=["no-ckpt", "ckpt"])
def test_tiny_models_within_5_percent(family, method, batch, seq, ckpt):
    m = Method(method, trainable_layers=1)
    assert_close(TINY[family], m, Workload(batch, seq, ckpt))


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_eager_attention_and_all_linear_lora(family):
    assert_close(TINY[family], Method("lora", rank=4, targets=("all-linear",)), Workload(2, 24, attention="eager"))


def test_bf16_llama_counts_the_rmsnorm_upcast():
    assert_close(TINY["llama"], Method("lora"), Workload(2, 32), Precision("bf16"))
    assert_close(TINY["llama"], Method("full"), Workload(2, 32, checkpointing=True), Precision("bf16"))


def test_unsupported_methods_say_so():
    for method in ("dora", "qlora"):
        with pytest.raises(ValueError, match=f"method='{method}': cannot be measured yet"):
            measure_against_estimate(TINY["llama"], Method(method), Precision(), Workload(1, 8))
    with pytest.raises(ValueError, match="too large to train"):
        measure_against_estimate("llama-2-7b", Method("lora"), Precision(), Workload(1, 8))


@pytest.mark.slow
@pytest.mark.parametrize("method, batch, seq, ckpt", [
    ("lora", 2, 64, False), ("lora", 1, 32, True), ("full", 1, 32, False), ("freeze", 2, 32, True),
])
def test_smollm2_within_5_percent(method, batch, seq, ckpt):
    assert_close("smollm2-135m", Method(method, targets=("all-linear",) if ckpt else None),
                 Workload(batch, seq, ckpt))
