"""Mixed precision: an fp32 model trained under torch.autocast, the standard trainer recipe.

Every custom autograd function (LoRA, DoRA with and without dropout, the 4-bit linear) runs forward and
backward under autocast, and its gradients agree, within bf16 tolerance, with the same model whose
custom functions are swapped for the plain autograd ops Hugging Face PEFT runs (nn.Linear maths that
autocast casts to bf16), using the same dropout keep-mask.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import slimtune
from slimtune.control import adapted_layers
from slimtune.layers.dora import DoraDropoutFn, DoraLinear, DoraLinearFn, dense_weight
from slimtune.layers.lora import LoraLinearFn, drop_probability, keep_mask
from slimtune.injection import make_adapter
from slimtune.layers.base import AdaptedLayer
from slimtune.quant import Linear4bit
from slimtune.quant.linear4bit import Linear4bitFn
from tests.conftest import tiny_llama, tokens


def _dropped(x, p, seed):
    if p == 0:
        return x
    keep = keep_mask(x.detach().reshape(-1, x.shape[-1]), p, seed).view(x.shape)
    return x * keep / (1 - drop_probability(p))


def plain_lora(x, base_out, A, B, scale, p, seed):
    """PEFT's LoRA forward: result + lora_B(lora_A(dropout(x))) * scaling."""
    return base_out + F.linear(F.linear(_dropped(x, p, seed), A), B) * scale


def plain_dora(x, base_out, A, B, m, norm, bias, scale):
    """PEFT's DoRA forward without dropout (base_result = result - bias)."""
    c = m / norm
    base_result = base_out - bias if bias is not None else base_out
    out = base_out + (c - 1) * base_result + c * F.linear(F.linear(x, A), B) * scale
    return out.to(base_out.dtype)


def plain_dora_dropout(x, base_out, A, B, m, norm, weight, scale, p, seed, layer):
    """PEFT's DoRA forward with dropout (base_result = W0 dropout(x))."""
    xd = _dropped(x, p, seed)
    c = m / norm
    W0 = dense_weight(layer) if weight is None else weight
    out = base_out + (c - 1) * F.linear(xd, W0) + c * F.linear(F.linear(xd, A), B) * scale
    return out.to(base_out.dtype)


def plain_4bit(x, bias, layer):
    return F.linear(x, layer.dequantize(), bias)


PLAIN = {LoraLinearFn: plain_lora, DoraLinearFn: plain_dora, DoraDropoutFn: plain_dora_dropout,
         Linear4bitFn: plain_4bit}


def _model(use_dora: bool, dropout: float, quantized: bool, bias: str = "none"):
    model = tiny_llama()
    if quantized:
        slimtune.quantize_model(model)
    slimtune.inject(model, slimtune.LoraConfig(r=4, alpha=8, target_modules="all-linear", use_dora=use_dora,
                                               dropout=dropout, bias=bias))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            for a in layer.adapters.values():
                a.lora_B.normal_(0, 0.1, generator=g)
                if isinstance(a, DoraLinear):
                    a.magnitude.mul_(1 + 0.2 * torch.rand(a.magnitude.shape, generator=g))
    return model.train()


def _grads(model, device_type="cpu", dtype=torch.bfloat16):
    ids = tokens().to(next(model.parameters()).device)
    torch.manual_seed(7)  # the same dropout seeds in every run
    with torch.autocast(device_type, dtype=dtype):
        loss = model(ids, labels=ids).loss
    loss.backward()
    return {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}


def relative_error(got: dict, want: dict) -> float:
    """Largest ||got - want|| / ||want|| over the tensors of ``want`` (all finite, none zero)."""
    assert got.keys() == want.keys() and len(want) > 0
    worst = 0.0
    for name, w in want.items():
        assert torch.isfinite(got[name]).all(), name
        assert w.abs().max() > 0, f"{name}: a zero reference gradient proves nothing"
        worst = max(worst, ((got[name].float() - w.float()).norm() / w.float().norm()).item())
    return worst


def max_relative_difference(model, monkeypatch, device_type="cpu", dtype=torch.bfloat16) -> float:
    """Gradients of every trainable tensor under autocast, fused vs the plain ops (see relative_error)."""
    plain_model = copy.deepcopy(model)
    fused = _grads(model, device_type, dtype)
    with monkeypatch.context() as mp:
        for fn, plain in PLAIN.items():
            mp.setattr(fn, "apply", staticmethod(plain))
        ref = _grads(plain_model, device_type, dtype)
    return relative_error(fused, ref)


CASES = [(dora, p, q) for dora in (False, True) for p in (0.0, 0.1) for q in (False, True)]


@pytest.mark.parametrize("use_dora,dropout,quantized", CASES,
                         ids=[f"{'dora' if d else 'lora'}-p{p}-{'nf4' if q else 'fp32'}" for d, p, q in CASES])
def test_autocast_bf16_gradients_match_plain_autograd(use_dora, dropout, quantized, monkeypatch):
    # Through a whole bf16 model, rounding in different places moves gradients by ~2% (the plain
    # autocast run differs from an fp32 run by as much); a wrong term or scale would be off by O(1).
    assert max_relative_difference(_model(use_dora, dropout, quantized), monkeypatch) < 5e-2


@pytest.mark.parametrize("use_dora", [False, True])
def test_autocast_with_a_trainable_bias(use_dora, monkeypatch):
    model = _model(use_dora, 0.0, False, bias="lora_only")
    with torch.no_grad():  # Llama has no biases: give q_proj one, so the trainable-bias branch runs
        layer = model.model.layers[0].self_attn.q_proj
        layer.base_layer.bias = torch.nn.Parameter(torch.randn(layer.base_layer.out_features) * 0.1)
    assert max_relative_difference(model, monkeypatch) < 5e-2


def _one_layer(kind: str, dropout: float):
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 48)
    if kind.endswith("nf4"):
        base = Linear4bit.from_linear(base)
    layer = AdaptedLayer(base).train()
    cfg = slimtune.LoraConfig(r=8, alpha=16, dropout=dropout, use_dora=kind.startswith("dora"))
    layer.add("a", make_adapter(base, "layer", cfg).train())
    with torch.no_grad():
        layer.adapters["a"].lora_B.normal_(0, 0.1)
    for p in [*layer.adapters["a"].adapter_params(), base.bias]:
        p.requires_grad_(True)
    return layer


def _layer_grads(layer, x, g):
    layer.zero_grad(set_to_none=True)  # fresh gradients (not accumulated onto the last run's)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    out.backward(g.to(out.dtype))
    named = dict(layer.named_parameters())
    return {"x": x.grad, **{n: p.grad.clone() for n, p in named.items() if p.requires_grad}}


LAYERS = [(k, p) for k in ("lora", "dora", "lora-nf4", "dora-nf4") for p in (0.0, 0.1)]


@pytest.mark.parametrize("kind,dropout", LAYERS, ids=[f"{k}-p{p}" for k, p in LAYERS])
def test_one_layer_under_autocast_matches_plain_autograd(kind, dropout, monkeypatch):
    # one layer, the same bf16 inputs: only the rounding order of the bf16 matmuls differs
    layer = _one_layer(kind, dropout)
    x, g = torch.randn(4, 8, 64), torch.randn(4, 8, 48)
    fused = _layer_grads(layer, x, g)
    with monkeypatch.context() as mp:
        for fn, plain in PLAIN.items():
            mp.setattr(fn, "apply", staticmethod(plain))
        ref = _layer_grads(layer, x, g)
    assert relative_error(fused, ref) < 1e-2


def test_autocast_output_dtype_is_what_peft_gives():
    # under autocast nn.Linear returns bf16; the adapted layer keeps that dtype (no silent fp32 activations)
    model = _model(False, 0.0, False)
    layer = model.model.layers[0].self_attn.q_proj
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(torch.randn(2, 3, 64))
    assert out.dtype == torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("use_dora,dropout,quantized", CASES)
def test_autocast_cuda_gradients_match_plain_autograd(dtype, use_dora, dropout, quantized, monkeypatch):
    model = _model(use_dora, dropout, quantized).cuda()
    assert max_relative_difference(model, monkeypatch, "cuda", dtype) < 3e-2
