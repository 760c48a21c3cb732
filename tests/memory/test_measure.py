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


@pytest.mark.parametrize("batch, seq", [(1, 16), (3, 40)])
@pytest.mark.parametrize("ckpt", [False, True], ids=["no-ckpt", "ckpt"])
def test_qlora_tiny_llama_within_5_percent(batch, seq, ckpt):
    assert_close(TINY["llama"], Method("qlora"), Workload(batch, seq, ckpt))


def test_qlora_counts_4bit_codes_statistics_and_bf16_adapters():
    from slimtune.memory.compare import build_model
    from slimtune.memory.measure import prepare, weight_tensors
    from slimtune.quant import Linear4bit

    model, _ = build_model(TINY["llama"])
    prepare(model, Method("qlora", rank=4, targets=("all-linear",)), Precision())
    quantized = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(quantized) == 14 and not isinstance(model.lm_head, Linear4bit)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {__import__("torch").bfloat16}
    ids = {id(t) for t in weight_tensors(model)}
    assert all(id(b) in ids for m in quantized for b in m.buffers(recurse=False))
    assert_close(TINY["llama"], Method("qlora", rank=4, targets=("all-linear",)), Workload(2, 24, attention="eager"))


def test_qlora_needs_linear_blocks():
    with pytest.raises(ValueError, match="Conv1D"):
        measure_against_estimate(TINY["gpt2"], Method("qlora"), Precision(), Workload(1, 8))


def test_unsupported_methods_say_so():
    for method in ("dora",):
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


@pytest.mark.slow
def test_smollm2_qlora_within_5_percent():
    assert_close("smollm2-135m", Method("qlora"), Workload(1, 32))
