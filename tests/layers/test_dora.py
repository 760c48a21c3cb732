"""DoRA against Hugging Face PEFT (the oracle) both ways, its maths, merging, and bf16 / 4-bit bases."""

import copy

import pytest
import torch

import slimtune
from slimtune import LoraConfig, inject, load_adapter, save_adapter
from slimtune import merging as mm
from slimtune.control import adapted_layers
from slimtune.layers.dora import DoraLinear, dense_weight
from tests.conftest import randomize_adapters, tiny_gpt2, tiny_llama, tokens

peft = pytest.importorskip("peft")

CASES = {  # name: (builder, slimtune config)
    "llama-all-linear": (tiny_llama, LoraConfig(r=4, alpha=8, target_modules="all-linear", use_dora=True)),
    "llama-rslora": (tiny_llama, LoraConfig(r=4, alpha=8, target_modules=("q_proj", "down_proj"), use_dora=True,
                                            use_rslora=True)),
    "gpt2-conv1d": (tiny_gpt2, LoraConfig(r=4, target_modules=("c_attn", "c_proj", "c_fc"), use_dora=True)),
}


def logits(model, ids=None):
    with torch.no_grad():
        return model(tokens() if ids is None else ids).logits


def randomize_dora(model, seed=1):
    """Random A, B and magnitudes near the real row norms (a random m would dwarf the base)."""
    randomize_adapters(model, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            for a in layer.adapters.values():
                if isinstance(a, DoraLinear):
                    a.magnitude.copy_(a.factored_norm(layer.base_layer) * (1 + 0.2 * torch.rand(a.magnitude.shape, generator=g)))


def test_norm_expansion_equals_dense_norm():
    g = torch.Generator().manual_seed(0)
    W0, A, B = torch.randn(16, 12, generator=g), torch.randn(4, 12, generator=g), torch.randn(16, 4, generator=g)
    dense = mm.dora_norm(W0, A, B, 0.7)
    fact = mm.dora_norm_factored(W0.square().sum(1), W0 @ A.T, A, B, 0.7)
    torch.testing.assert_close(fact, dense, atol=1e-5, rtol=1e-5)
    m = torch.rand(16, generator=g) + 0.5
    merged, norm = mm.dora_merged(W0, A, B, 0.7, m)
    torch.testing.assert_close(torch.linalg.vector_norm(merged, dim=1), m)  # rows have norm m
    torch.testing.assert_close(mm.dora_unmerged(merged, A, B, 0.7, m, norm), W0, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_slimtune_dora_file_loads_in_peft_with_equal_outputs_and_gradients(case, tmp_path):
    build, cfg = CASES[case]
    ours = build()
    base = logits(ours)
    inject(ours, cfg)
    torch.testing.assert_close(logits(ours), base, atol=0, rtol=0)  # step 0 equals the base
    randomize_dora(ours)
    save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(build(), tmp_path, is_trainable=True).eval()
    torch.testing.assert_close(logits(theirs), logits(ours), atol=1e-5, rtol=1e-5)
    # gradients of A, B and m agree (eval mode: GPT-2's own dropout would differ between runs)
    ids = tokens()
    ours(ids, labels=ids).loss.backward()
    theirs(ids, labels=ids).loss.backward()
    peft_grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    leaf_to_peft = {"lora_A": "lora_A.default.weight", "lora_B": "lora_B.default.weight",
                    "magnitude": "lora_magnitude_vector.default.weight"}
    n = 0
    for name, p in ours.named_parameters():
        if p.requires_grad:
            module, _, leaf = name.partition(".adapters.default.")
            torch.testing.assert_close(p.grad, peft_grads[f"base_model.model.{module}.{leaf_to_peft[leaf]}"],
                                       atol=1e-6, rtol=1e-4)
            n += 1
    assert n == len(peft_grads)
    # merged weights agree with PEFT's merge
    merged_ours = slimtune.merge_and_unload(ours).state_dict()
    merged_theirs = theirs.merge_and_unload().state_dict()
    for k in merged_ours:
        torch.testing.assert_close(merged_ours[k], merged_theirs[k], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case", ["llama-all-linear", "gpt2-conv1d"])
def test_peft_dora_file_loads_in_slimtune_with_equal_outputs(case, tmp_path):
    build, cfg = CASES[case]
    targets = cfg.target_modules if isinstance(cfg.target_modules, str) else list(cfg.target_modules)
    theirs = peft.get_peft_model(build(), peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, target_modules=targets,
                                                          use_dora=True, task_type="CAUSAL_LM")).eval()
    randomize_adapters(theirs, std=0.05, seed=3)
    theirs.save_pretrained(tmp_path)
    ours = build()
    report = load_adapter(ours, tmp_path)
    assert ours.slimtune_configs["default"].use_dora and report.trainable_params == theirs.get_nb_trainable_parameters()[0]
    torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-5, rtol=1e-5)


def test_merge_unmerge_exact_and_idempotent():
    model = tiny_llama()
    inject(model, CASES["llama-all-linear"][1])
    randomize_dora(model)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    before = logits(model)
    slimtune.merge(model)
    slimtune.merge(model)  # idempotent
    torch.testing.assert_close(logits(model), before, atol=1e-5, rtol=1e-5)
    slimtune.unmerge(model)
    slimtune.unmerge(model)
    for n, p in model.named_parameters():
        if n in w0:
            torch.testing.assert_close(p, w0[n], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(logits(model), before, atol=1e-6, rtol=1e-6)


def test_bf16_base_tracks_fp32_and_trains():
    ref = tiny_llama()
    inject(ref, CASES["llama-all-linear"][1])
    randomize_dora(ref)
    half = copy.deepcopy(ref).to(torch.bfloat16)
    assert next(a for _, l in adapted_layers(half) for a in l.adapters.values()).magnitude.dtype == torch.bfloat16
    torch.testing.assert_close(logits(half).float(), logits(ref), atol=0.1, rtol=0.05)
    # the gradients track the fp32 model's within bf16 tolerance (relative to each tensor's norm)
    ref.train()
    half.train()
    ref(tokens(), labels=tokens()).loss.backward()
    half(tokens(), labels=tokens()).loss.backward()
    want = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    got = {n: p.grad.float() for n, p in half.named_parameters() if p.requires_grad}
    assert got.keys() == want.keys() and want
    for n in want:
        assert want[n].norm() > 0 and (got[n] - want[n]).norm() < 0.05 * want[n].norm(), n


def test_4bit_base_equals_dequantized_float_base():
    quant = pytest.importorskip("slimtune.quant")
    q = tiny_llama()
    quant.quantize_model(q)
    f = copy.deepcopy(q)
    quant.dequantize_model(f, torch.float32)
    cfg = LoraConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"), use_dora=True)
    inject(q, cfg)
    inject(f, cfg)
    randomize_dora(q)
    f.load_state_dict({k: v for k, v in q.state_dict().items() if ".adapters." in k}, strict=False)
    torch.testing.assert_close(logits(q), logits(f), atol=1e-5, rtol=1e-5)
    # and so do the gradients of every adapter tensor (the 4-bit backward dequantizes the same weight)
    for model in (q, f):
        model.train()
        model(tokens(), labels=tokens()).loss.backward()
    want = {n: p.grad for n, p in f.named_parameters() if p.requires_grad}
    got = {n: p.grad for n, p in q.named_parameters() if p.requires_grad}
    assert got.keys() == want.keys() and all(w.abs().max() > 0 for w in want.values())
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-5, rtol=1e-4)


def _reference_dora(base, dora, x, xd):
    """Plain-autograd DoRA, PEFT's formula: base(x) + (c - 1) W0 xd + c s B A xd with c = m / ||W0 + sBA||
    (norm detached); without dropout (xd is x) it is x W'^T + b, W' = c V."""
    W0 = dense_weight(base)
    c = dora.magnitude / mm.dora_norm(W0, dora.lora_A, dora.lora_B, dora.scale).detach().to(x.dtype)
    lora = (xd @ dora.lora_A.T) @ dora.lora_B.T * dora.scale
    return torch.nn.functional.linear(x, W0, base.bias) + (c - 1) * (xd @ W0.T) + c * lora


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_trainable_bias_gets_the_plain_gradient(dropout, conv1d):
    # out = x W'^T + b: d/db is the plain sum of the output gradient, not scaled by m / ||V||
    from transformers.pytorch_utils import Conv1D

    from slimtune.layers.base import AdaptedLayer
    from slimtune.layers.lora import drop_probability, keep_mask

    torch.manual_seed(0)
    base = (Conv1D(12, 16) if conv1d else torch.nn.Linear(16, 12)).double()
    torch.nn.init.normal_(base.bias)
    base.weight.requires_grad_(False)
    dora = DoraLinear(base, 4, 8.0, dropout, fan_in_fan_out=conv1d).double()
    layer = AdaptedLayer(base).train()
    layer.add("a", dora)
    with torch.no_grad():
        dora.lora_B.normal_()
        dora.magnitude.mul_(1.5)
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 5, 12, dtype=torch.float64)
    leaves = (x, dora.lora_A, dora.lora_B, dora.magnitude, base.bias)
    torch.manual_seed(1)
    ours = torch.autograd.grad(layer(x), leaves, g)
    torch.manual_seed(1)
    seed = int(torch.randint(0, 2**62, (1,)).item())
    xd = x * keep_mask(x.detach().reshape(-1, 16), dropout, seed).view(x.shape) / (1 - drop_probability(dropout)) \
        if dropout else x
    want = torch.autograd.grad(_reference_dora(base, dora, x, xd), leaves, g)
    for name, got, ref in zip(("x", "A", "B", "m", "bias"), ours, want):  # the row norm is computed in fp32
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    torch.testing.assert_close(ours[-1], g.sum((0, 1)))


def test_dora_on_embedding_is_a_clear_error():
    with pytest.raises(TypeError, match=r"lora.use_dora=True: supported on linear and conv \(Conv1d, Conv2d\) "
                                        r"layers only; model.embed_tokens is a Embedding"):
        inject(tiny_llama(), LoraConfig(target_modules=("embed_tokens", "q_proj"), use_dora=True))


def test_cached_base_norm_follows_changes_to_the_base_weight():
    # ||W0|| per row is cached between steps; loading new base weights or merging another adapter must
    # refresh it, or the output silently uses the old base's norm
    model = tiny_llama()
    inject(model, LoraConfig(r=4, alpha=8, target_modules=("q_proj",), use_dora=True), "a")
    inject(model, LoraConfig(r=4, alpha=8, target_modules=("q_proj",), use_dora=True), "b")
    randomize_dora(model)
    slimtune.set_active(model, ["a", "b"])
    logits(model)  # fills the caches
    slimtune.merge(model, ["a"])  # W0 -> W0 + a's update, in place; b still runs unmerged on top
    fresh = copy.deepcopy(model)
    for _, layer in adapted_layers(fresh):
        layer.adapters["b"]._w0_sq_cache = None
    torch.testing.assert_close(logits(model), logits(fresh), atol=0, rtol=0)
    layer = model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(layer.adapters["b"]._w0_sq_cache[1],
                               torch.linalg.vector_norm(layer.base_layer.weight, dim=1).square())
    with torch.no_grad():  # as load_state_dict does
        model.model.layers[0].self_attn.q_proj.base_layer.weight.mul_(1.5)
        fresh.model.layers[0].self_attn.q_proj.base_layer.weight.mul_(1.5)
    for _, layer in adapted_layers(fresh):
        layer.adapters["b"]._w0_sq_cache = None
    torch.testing.assert_close(logits(model), logits(fresh), atol=0, rtol=0)
