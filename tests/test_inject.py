"""Targeting, freezing and the injection report, checked against PEFT's choices where PEFT has them."""

import pytest
import torch
from torch import nn

import slimtune
from slimtune import LoraConfig, inject
from slimtune.control import adapted_layers
from tests.conftest import conv_toy, tiny_bert_cls, tiny_gpt2, tiny_llama


def wrapped_names(model):
    return {n for n, _ in adapted_layers(model)}


def test_4096_square_linear_at_rank_8_trains_65536_params():
    model = nn.Sequential(nn.Linear(4096, 4096, bias=False))
    report = inject(model, LoraConfig(r=8, target_modules=("0",)))
    assert report.trainable_params == 65_536 == 2 * 8 * 4096
    assert report.total_params == 4096 * 4096 + 65_536
    assert "65,536" in str(report)


def test_only_adapter_params_train_and_step0_output_equals_base(llama, fresh):
    base = fresh(llama)
    x = torch.randint(0, 128, (2, 10))
    report = inject(llama, LoraConfig(r=4, target_modules="all-linear"))
    trainable = {n for n, p in llama.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A" in n or ".lora_B" in n for n in trainable)
    assert report.trainable_params == sum(p.numel() for n, p in llama.named_parameters() if n in trainable)
    assert torch.equal(llama(x).logits, base(x).logits)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2, tiny_bert_cls])
def test_all_linear_selects_the_same_modules_as_peft(build):
    peft = pytest.importorskip("peft")
    ours, theirs = build(), build()
    inject(ours, LoraConfig(target_modules="all-linear"))
    task = "SEQ_CLS" if "Sequence" in type(theirs).__name__ else "CAUSAL_LM"
    pm = peft.get_peft_model(theirs, peft.LoraConfig(target_modules="all-linear", task_type=task))
    peft_names = {n.removeprefix("base_model.model.") for n, m in pm.named_modules()
                  if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert wrapped_names(ours) == peft_names


def test_suffix_regex_types_exclude_and_layers():
    m = tiny_llama()
    inject(m, LoraConfig(target_modules=("q_proj", "v_proj"), exclude_modules=("model.layers.1.self_attn.v_proj",)))
    assert wrapped_names(m) == {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                                "model.layers.1.self_attn.q_proj"}
    m = tiny_llama()
    inject(m, LoraConfig(target_modules=r".*\.mlp\.(up|down)_proj"))
    assert wrapped_names(m) == {f"model.layers.{i}.mlp.{p}" for i in (0, 1) for p in ("up_proj", "down_proj")}
    m = tiny_llama()
    inject(m, LoraConfig(target_modules=("o_proj",), layers_to_transform=(1,), layers_pattern="layers"))
    assert wrapped_names(m) == {"model.layers.1.self_attn.o_proj"}
    m = tiny_llama()
    inject(m, LoraConfig(target_modules=(), target_types=("Embedding",)))
    assert wrapped_names(m) == {"model.embed_tokens"}


def test_rank_and_alpha_patterns_apply_per_module():
    m = tiny_llama()
    inject(m, LoraConfig(r=4, alpha=8, target_modules=("q_proj", "k_proj"),
                         rank_pattern={"k_proj": 2}, alpha_pattern={"model.layers.0.self_attn.q_proj": 32}))
    layers = dict(adapted_layers(m))
    assert layers["model.layers.0.self_attn.k_proj"].adapters["default"].r == 2
    assert layers["model.layers.1.self_attn.q_proj"].adapters["default"].r == 4
    assert layers["model.layers.0.self_attn.q_proj"].adapters["default"].scale == pytest.approx(32 / 4)
    assert layers["model.layers.1.self_attn.q_proj"].adapters["default"].scale == pytest.approx(8 / 4)


def test_target_matching_nothing_names_closest_real_modules():
    with pytest.raises(ValueError) as err:
        inject(tiny_llama(), LoraConfig(target_modules=("q_prj",)))
    msg = str(err.value)
    assert "lora.target_modules=('q_prj',)" in msg and "q_proj" in msg


def test_bad_adapter_name_and_duplicate_are_refused(llama):
    with pytest.raises(ValueError, match="adapter_name='a b'"):
        inject(llama, LoraConfig(target_modules=("q_proj",)), adapter_name="a b")
    inject(llama, LoraConfig(target_modules=("q_proj",)))
    with pytest.raises(ValueError, match="already has an adapter"):
        inject(llama, LoraConfig(target_modules=("q_proj",)))


def test_modules_to_save_trains_a_copy_and_leaves_the_original():
    m = tiny_bert_cls()
    original = m.classifier.weight.detach().clone()
    report = inject(m, LoraConfig(target_modules=("query", "value"), modules_to_save=("classifier",)))
    assert report.saved_modules == ("classifier",)
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert "classifier.copies.default.weight" in trainable and "classifier.original.weight" not in trainable
    with torch.no_grad():
        m.classifier.copies["default"].weight.add_(1.0)
    assert torch.equal(m.classifier.original.weight, original)


def test_bias_modes():
    m = tiny_gpt2()
    inject(m, LoraConfig(target_modules=("c_attn",), bias="lora_only"))
    biases = {n for n, p in m.named_parameters() if p.requires_grad and n.endswith("bias")}
    assert biases == {f"transformer.h.{i}.attn.c_attn.base_layer.bias" for i in (0, 1)}
    m = tiny_gpt2()
    inject(m, LoraConfig(target_modules=("c_attn",), bias="all"))
    assert {n for n, p in m.named_parameters() if n.endswith("bias")} == \
        {n for n, p in m.named_parameters() if p.requires_grad and n.endswith("bias")}


def test_conv_and_embedding_layers_are_wrapped():
    m = conv_toy()
    report = inject(m, LoraConfig(r=2, target_modules=("conv1", "conv2", "seq")))
    assert {w.kind for w in report.wrapped} == {"Conv2d", "Conv1d"}
    m = tiny_llama()
    report = inject(m, LoraConfig(r=4, target_modules=("embed_tokens",)))
    assert report.wrapped[0].kind == "Embedding" and report.trainable_params == 4 * (128 + 64)


def test_public_api_names():
    import slimtune.files  # noqa: F401  (importing submodules must not shadow the public functions)
    import slimtune.injection  # noqa: F401

    for name in ("LoraConfig", "inject", "save_adapter", "load_adapter", "merge", "unmerge", "merge_and_unload"):
        assert callable(getattr(slimtune, name))
