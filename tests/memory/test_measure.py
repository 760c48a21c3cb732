"""Estimate vs measured, component by component, within 5% (issue #3, item 4).

Every method is measured: full, freeze, LoRA, QLoRA, DoRA, bottleneck adapters and prompt tuning."""

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
@pytest.mark.parametrize("method", ["full", "freeze", "lora", "dora", "adapter", "prompt-tuning"])
@pytest.mark.parametrize("batch, seq", [(1, 16), (3, 40)])
@pytest.mark.parametrize("ckpt", [False, True], ids=["no-ckpt", "ckpt"])
def test_tiny_models_within_5_percent(family, method, batch, seq, ckpt):
    m = Method(method, trainable_layers=1)
    assert_close(TINY[family], m, Workload(batch, seq, ckpt))


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_eager_attention_and_all_linear_lora(family, method):
    # BERT's all-linear includes the MLM head's transform dense, whose LoRA/DoRA branch saves too
    assert_close(TINY[family], Method(method, rank=4, targets=("all-linear",)), Workload(2, 24, attention="eager"))


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_eager_attention_adapter_and_prompt(family):
    # eager keeps b*heads*(s + n)^2 probabilities: the virtual tokens are attended to like real ones
    assert_close(TINY[family], Method("adapter", adapter_dim=16), Workload(2, 24, attention="eager"))
    assert_close(TINY[family], Method("prompt-tuning", prompt_tokens=8), Workload(2, 24, attention="eager"))


@pytest.mark.parametrize("method", ["dora", "adapter", "prompt-tuning"])
def test_bf16_llama_dora_adapter_prompt(method):
    # DoRA's scale c is bf16, its row norm fp32; the prompt table is cast to bf16 with the model
    assert_close(TINY["llama"], Method(method), Workload(2, 32), Precision("bf16"))
    assert_close(TINY["llama"], Method(method), Workload(1, 32, checkpointing=True), Precision("bf16"))


def test_bf16_llama_counts_the_rmsnorm_upcast():
    assert_close(TINY["llama"], Method("lora"), Workload(2, 32), Precision("bf16"))
    assert_close(TINY["llama"], Method("full"), Workload(2, 32, checkpointing=True), Precision("bf16"))


@pytest.mark.parametrize("batch, seq", [(1, 16), (3, 40)])
@pytest.mark.parametrize("ckpt", [False, True], ids=["no-ckpt", "ckpt"])
def test_qlora_tiny_llama_within_5_percent(batch, seq, ckpt):
    assert_close(TINY["llama"], Method("qlora"), Workload(batch, seq, ckpt))


def test_qlora_counts_4bit_codes_statistics_and_fp32_adapters():
    from slimtune.memory.compare import build_model
    from slimtune.memory.measure import prepare, weight_tensors
    from slimtune.quant import Linear4bit

    model, _ = build_model(TINY["llama"])
    prepare(model, Method("qlora", rank=4, targets=("all-linear",)), Precision())
    quantized = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(quantized) == 14 and not isinstance(model.lm_head, Linear4bit)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {__import__("torch").float32}
    ids = {id(t) for t in weight_tensors(model)}
    assert all(id(b) in ids for m in quantized for b in m.buffers(recurse=False))
    assert_close(TINY["llama"], Method("qlora", rank=4, targets=("all-linear",)), Workload(2, 24, attention="eager"))


def test_qlora_needs_linear_blocks():
    with pytest.raises(ValueError, match="Conv1D"):
        measure_against_estimate(TINY["gpt2"], Method("qlora"), Precision(), Workload(1, 8))


def test_unmeasurable_settings_say_so():
    with pytest.raises(ValueError, match="too large to train"):
        measure_against_estimate("llama-2-7b", Method("lora"), Precision(), Workload(1, 8))
    with pytest.raises(ValueError, match="master_weights=True: not measurable"):
        measure_against_estimate(TINY["llama"], Method("dora"), Precision(master_weights=True), Workload(1, 8))
    with pytest.raises(ValueError, match=r"workload.seq=50 \+ method.prompt_tokens=20: more positions than"):
        measure_against_estimate(TINY["gpt2"], Method("prompt-tuning"), Precision(), Workload(1, 50))


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_prepare_wraps_what_slimtune_trains(family):
    import torch

    from slimtune.layers.base import AdaptedLayer
    from slimtune.layers.bottleneck import BottleneckAdapter
    from slimtune.layers.dora import DoraLinear
    from slimtune.memory.compare import build_model
    from slimtune.memory.measure import prepare
    from slimtune.methods.prompt import prompt_of

    model, arch = build_model(TINY[family])
    prepare(model, Method("dora", rank=4), Precision())
    dora = [m for m in model.modules() if isinstance(m, DoraLinear)]
    assert len(dora) == arch.layers * (1 if family == "gpt2" else 2)  # c_attn; q and v projections
    model, arch = build_model(TINY[family])
    prepare(model, Method("adapter", adapter_dim=16), Precision())
    wrapped = [n for n, m in model.named_modules()
               if isinstance(m, AdaptedLayer) and isinstance(m.adapters["default"], BottleneckAdapter)]
    assert len(wrapped) == 2 * arch.layers  # after the attention and the MLP output projections
    model, _ = build_model(TINY[family])
    prepare(model, Method("prompt-tuning", prompt_tokens=5), Precision("bf16"))
    assert prompt_of(model).embedding.dtype == torch.bfloat16
    assert [p.shape for p in model.parameters() if p.requires_grad] == [(5, 64)]


def test_estimated_adapter_nonlinearity_is_bottleneck_configs_default():
    from slimtune.config import BottleneckConfig
    from slimtune.memory.families import ADAPTER_NONLINEARITY

    assert BottleneckConfig().nonlinearity == ADAPTER_NONLINEARITY


@pytest.mark.parametrize("nonlinearity", ["relu", "tanh", "gelu", "silu"])
def test_adapter_nonlinearities_save_what_the_estimate_says(nonlinearity):
    """relu and tanh keep only their output (up's input too); gelu and silu also keep their input."""
    import slimtune
    from slimtune.memory.compare import build_model
    from slimtune.memory.families import Training, saved_activations
    from slimtune.memory.measure import batch_for, saved_storages

    model, arch = build_model(TINY["llama"])
    slimtune.inject(model, slimtune.BottleneckConfig(size=16, nonlinearity=nonlinearity))
    model.train().config._attn_implementation = "sdpa"
    saved: dict[int, int] = {}
    with saved_storages(model, saved):
        model(**batch_for(model, 2, 24)).loss
    t = Training(2, 24, 4.0, device="cpu", first_trainable_layer=arch.layers, adapter_dim=16,
                 adapter_nonlinearity=nonlinearity)
    assert saved_activations(arch, t).total == pytest.approx(sum(saved.values()), rel=1e-3)


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


@pytest.mark.slow
@pytest.mark.parametrize("method, batch, seq, ckpt", [
    ("dora", 2, 32, False), ("adapter", 1, 32, True), ("prompt-tuning", 1, 32, False),
])
def test_smollm2_dora_adapter_prompt_within_5_percent(method, batch, seq, ckpt):
    assert_close("smollm2-135m", Method(method), Workload(batch, seq, ckpt))


@pytest.mark.parametrize("adapter_dtype, bytes_per", [("float32", 4), ("base", 2)])
@pytest.mark.parametrize("method", ["lora", "dora", "adapter", "qlora"])
def test_adapters_on_a_bf16_base_are_counted_as_created(method, adapter_dtype, bytes_per):
    # slimtune.inject creates adapters in fp32 on a bf16 (or 4-bit) base unless adapter_dtype="base";
    # the estimate counts their weights, gradients and AdamW moments in that dtype
    precision = Precision(None if method == "qlora" else "bf16", adapter_dtype=adapter_dtype)
    est, meas = measure_against_estimate(TINY["llama"], Method(method), precision, Workload(2, 16))
    n = meas.trainable_params
    assert meas.gradients == n * bytes_per == est["gradients"]
    assert meas.optimizer >= 2 * n * bytes_per and est["optimizer"] == 2 * n * bytes_per
    e, m = est.as_dict(), meas.as_dict()
    for key in KEYS:
        assert abs(e[key] - m[key]) <= TOLERANCE * max(m[key], 1), (key, e[key], m[key])
