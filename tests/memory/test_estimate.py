"""The estimator's maths against numbers worked out by hand, and against Hugging Face's numel()."""

from __future__ import annotations

import subprocess
import sys

import pytest

from slimtune.memory import presets
from slimtune.memory.arch import from_hf_config, lora_params, targeted_linears, total_params
from slimtune.memory.estimate import compare, estimate, trainable_count
from slimtune.memory.formulas import nf4_bits_per_param, optimizer_state_bytes
from slimtune.memory.spec import Method, Precision, Workload

from .conftest import TINY


def test_estimator_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "from slimtune.memory.estimate import estimate\n"
            "from slimtune.memory.plan import plan\n"
            "import slimtune.memory.commands, slimtune.memory.render\n"
            "assert estimate('llama-2-7b', 'lora').total > 0\n"
            "assert 'torch' not in sys.modules or sys.modules['torch'] is None\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.mark.parametrize("precision, parts", [
    (Precision("fp16", "fp16", "adamw", "fp32"), (14e9, 14e9, 56e9)),     # seed 000 "AMP": 84 GB
    (Precision("fp16", "fp16", "adamw", "fp16"), (14e9, 14e9, 28e9)),     # seed 003 FP16: 56 GB
    (Precision("fp32", "fp32", "adamw", "fp32"), (28e9, 28e9, 56e9)),     # seed 002: 112 GB
])
def test_seed_figures_for_7b(precision, parts):
    d = estimate(7e9, "full", precision).as_dict()
    assert (d["weights"], d["gradients"], d["optimizer"], d["activations"]) == (*parts, 0)
    assert d["total"] == sum(parts)


def test_seed_001_master_weights_8b():
    d = estimate(8e9, "full", Precision("fp16", "fp16", "adamw", "fp32", master_weights=True)).as_dict()
    assert (d["weights"], d["gradients"], d["optimizer"], d["total"]) == (16e9, 16e9, 96e9, 128e9)


def test_lora_count_4096_square_rank_8():
    assert lora_params(4096, 4096, 8) == 65_536
    assert 4096 * 4096 // lora_params(4096, 4096, 8) == 256


def test_nf4_double_quant_bits_and_70b():
    assert round(nf4_bits_per_param(), 3) == 4.127
    assert nf4_bits_per_param(double_quant=False) == 4.5
    assert estimate(70e9, "full", Precision("fp16"))["weights"] == 140e9
    weights = estimate(70e9, "qlora", trainable=0)["weights"]
    assert 36.0e9 < weights < 36.2e9


def test_optimizer_rules():
    assert optimizer_state_bytes("adamw", "fp32") == 8
    assert optimizer_state_bytes("adamw", "bf16") == 4
    assert optimizer_state_bytes("sgd", "fp32") == 4
    assert optimizer_state_bytes("none", "fp32") == 0
    assert optimizer_state_bytes("adamw-8bit", "fp32") == pytest.approx(2.03125)


@pytest.mark.parametrize("name, params", [
    ("llama-2-7b", 6_738_415_616), ("llama-2-13b", 13_015_864_320), ("llama-2-70b", 68_976_648_192),
    ("llama-3-8b", 8_030_261_248), ("mistral-7b", 7_241_732_096), ("qwen2.5-7b", 7_615_616_512),
    ("smollm2-135m", 134_515_008), ("gpt2", 124_439_808), ("bert-base", 109_514_298),
])
def test_preset_parameter_counts(name, params):
    assert total_params(presets.model(name)) == params


@pytest.mark.parametrize("targets, expected", [
    (("q_proj", "v_proj"), 4_194_304),                              # 32 x 2 x 65,536
    (("q_proj", "k_proj", "v_proj", "o_proj"), 8_388_608),
    (("all-linear",), 19_988_480),                                  # PEFT's print_trainable_parameters
])
def test_llama_2_7b_lora_counts(targets, expected):
    assert trainable_count(presets.model("llama-2-7b"), Method("lora", targets=targets)) == expected


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_counts_match_hugging_face_numel(family):
    transformers = pytest.importorskip("transformers")
    import slimtune

    cfg = transformers.AutoConfig.for_model(**TINY[family])
    auto = transformers.AutoModelForMaskedLM if family == "bert" else transformers.AutoModelForCausalLM
    model = auto.from_config(cfg)
    arch = from_hf_config(TINY[family])
    assert total_params(arch) == sum(p.numel() for p in model.parameters())
    report = slimtune.inject(model, slimtune.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    assert trainable_count(arch, Method("lora", rank=4, targets=("all-linear",))) == report.trainable_params


def test_smollm2_lora_counts_match_inject():
    pytest.importorskip("transformers")
    import slimtune
    from slimtune.assets import load_smollm2

    model, _ = load_smollm2()
    report = slimtune.inject(model, slimtune.LoraConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj")))
    assert trainable_count(presets.model("smollm2-135m"), Method("lora")) == report.trainable_params == 460_800


def test_every_method_on_every_preset():
    for name in presets.MODELS:
        for method in ("full", "freeze", "lora", "qlora", "dora", "bottleneck", "prompt"):
            e = estimate(name, Method(method, targets=("all-linear",)), workload=Workload(1, 256))
            assert e.total > 0 and all(c.bytes >= 0 and c.rule for c in e.components)


def test_peft_methods_shrink_gradients_and_optimizer():
    full, lora, qlora = compare("llama-2-7b", ("full", "lora", "qlora"))
    # 4.2M fp32 adapter gradients (adapters are fp32 on the bf16 base) against 6.7B bf16 ones
    assert lora["gradients"] == lora.trainable_params * 4 < full["gradients"] / 800
    assert qlora["weights"] < lora["weights"] / 3
    assert lora["activations"] < full["activations"]


def test_checkpointing_and_flash_attention_cut_activations():
    base = dict(model="llama-2-7b", method="full")
    eager = estimate(**base, workload=Workload(1, 2048, attention="eager"))["activations"]
    sdpa = estimate(**base, workload=Workload(1, 2048))["activations"]
    ckpt = estimate(**base, workload=Workload(1, 2048, checkpointing=True))["activations"]
    assert ckpt < sdpa < eager
    # eager keeps b*heads*s^2 probabilities: fp32 softmax, bf16 copy, per layer
    assert eager - sdpa > 32 * 32 * 2048**2 * (4 + 2) * 0.9


def test_korthikanti_eq1_plus_documented_departures():
    """GPT-3 175B block, s=2048, b=1, fp16, eager attention with dropout, on CUDA: Korthikanti et al.
    (2022) eq. 1 gives s*b*h*(34 + 5*a*s/h) bytes. Ours adds exactly what docs/memory.md lists:
    transformers' tanh-GELU keeps 4 tensors of 4h instead of 1 (+24 sbh), eager bmm keeps the whole fused
    q/k/v output plus copies of k and v (+4 sbh), and LayerNorm's fp32 mean and rstd (2 x 2 x 4s bytes)."""
    from dataclasses import replace

    from slimtune.memory.estimate import training_for
    from slimtune.memory.families import saved_activations

    arch = replace(presets.model("gpt3-175b"), attn_dropout=0.1, hidden_dropout=0.1)
    s, h, a = 2048, arch.hidden, arch.heads
    e = estimate(arch, "full", Precision("fp16"), Workload(1, s, attention="eager"))
    per_block = saved_activations(arch, training_for(arch, e.method, e.precision, e.workload)).per_block
    paper = s * h * (34 + 5 * a * s / h)
    assert per_block == paper + s * h * (24 + 4) + 2 * 2 * 4 * s


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="sft"), "method='sft': must be one of full, freeze"),
    (dict(precision=Precision("fp16"), method="qlora"), "method qlora keeps its base in nf4"),
    (dict(precision=Precision("nf4"), method="full"), "precision.weight_dtype='nf4': method full trains"),
    (dict(method=Method("lora", targets=("c_attn",))), "matches no linear layer; known:"),
    (dict(method=Method("freeze", trainable_layers=99)), "method.trainable_layers=99"),
])
def test_errors_name_field_value_and_allowed(kwargs, message):
    with pytest.raises(ValueError, match=message):
        estimate("llama-2-7b", **kwargs)


def test_spec_validation():
    with pytest.raises(ValueError, match="precision.weight_dtype='fp8': must be one of fp32, bf16, fp16, int8, nf4"):
        Precision("fp8")
    with pytest.raises(ValueError, match="workload.batch=0: must be a positive integer"):
        Workload(batch=0)
    with pytest.raises(ValueError, match="method.rank=0"):
        Method("lora", rank=0)
    with pytest.raises(ValueError, match="needs? .*--trainable N|give --model"):
        estimate(7e9, "lora")
    with pytest.raises(ValueError, match="not a preset or an existing config.json"):
        estimate("llama-9")
    assert estimate(7e9, "lora", trainable=4_194_304).trainable_params == 4_194_304


def test_dora_keeps_one_output_and_two_vectors_more_than_lora():
    """slimtune's DoraLinearFn saves x, A x and the fresh (tokens, d_out) y = (W0 + s B A) x (bf16: the
    narrower of the fp32 adapters' and the bf16 activations' dtypes), plus the (d_out,) fp32 scale
    m / norm and the fp32 norm; the base output itself is not kept."""
    arch = presets.model("llama-2-7b")
    w = Workload(2, 512)
    lora = estimate(arch, "lora", workload=w)["activations"]
    dora = estimate(arch, "dora", workload=w)["activations"]
    tokens, q, v = 2 * 512, arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    assert dora - lora == arch.layers * sum(tokens * d * 2 + d * (4 + 4) for d in (q, v))


def test_relu_adapter_keeps_its_input_and_bottleneck_once():
    """relu saves its output, which is also up's input: one (tokens, m) tensor per adapter (fp32, the
    adapter's dtype on a bf16 base), plus the adapter's input (the wrapped projection's output, kept by
    nobody else in a frozen block)."""
    arch = presets.model("llama-2-7b")
    w = Workload(1, 256)
    wide = estimate(arch, Method("bottleneck", adapter_dim=128), workload=w)["activations"]
    narrow = estimate(arch, Method("bottleneck", adapter_dim=64), workload=w)["activations"]
    assert wide - narrow == arch.layers * 2 * 256 * (128 - 64) * 4
    base = Precision(adapter_dtype="base")  # bf16 adapters: 2 bytes
    wide = estimate(arch, Method("bottleneck", adapter_dim=128), base, workload=w)["activations"]
    narrow = estimate(arch, Method("bottleneck", adapter_dim=64), base, workload=w)["activations"]
    assert wide - narrow == arch.layers * 2 * 256 * (128 - 64) * 2


def test_prompt_tuning_counts_virtual_tokens_and_the_batch_1_gradient_view():
    arch = presets.model("smollm2-135m")
    one = estimate(arch, Method("prompt", prompt_tokens=20), workload=Workload(1, 64))
    two = estimate(arch, Method("prompt", prompt_tokens=20), workload=Workload(2, 64))
    assert one.trainable_params == two.trainable_params == 20 * arch.hidden
    assert one["gradients"] == (20 + 64) * arch.hidden * 2  # the (1, n + s, h) input gradient, kept whole
    assert two["gradients"] == 20 * arch.hidden * 2
    assert "s=64 + 20 virtual" in next(c.rule for c in one.components if c.name == "activations")
    longer = estimate(arch, Method("prompt", prompt_tokens=20), workload=Workload(2, 84))
    # the blocks see 84 positions either way; only the loss's labels and the embedding lookups differ
    assert abs(longer["activations"] - estimate(arch, Method("prompt", prompt_tokens=40),
                                                workload=Workload(2, 64))["activations"]) < 0.01 * longer["activations"]


@pytest.mark.parametrize("alias, canonical", [("adapter", "bottleneck"), ("prompt-tuning", "prompt"),
                                              ("prompt_tuning", "prompt"), ("QLoRA", "qlora")])
def test_method_aliases_normalise_to_the_canonical_name(alias, canonical):
    assert Method(alias).name == canonical
    assert estimate("llama-2-7b", alias).as_dict() == estimate("llama-2-7b", canonical).as_dict()
    assert [e.method.name for e in compare("llama-2-7b", ("full", alias))] == ["full", canonical]


def test_unknown_method_lists_the_canonical_names():
    with pytest.raises(ValueError, match="method='adaptor': must be one of full, freeze, lora, qlora, dora, "
                                         "bottleneck, prompt$"):
        Method("adaptor")
