"""torch.autograd.gradcheck (float64) for every custom autograd function, in every branch: with and
without dropout, with a trainable bias, a GPT-2 Conv1D (fan-in-fan-out) base, a 4-bit base, and with
inputs that need no gradient. The dropout mask is a pure function of its seed, so the function is
deterministic for gradcheck's finite differences."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from slimtune.layers.base import AdaptedLayer
from slimtune.layers.dora import DoraDropoutFn, DoraLinear, DoraLinearFn
from slimtune.layers.lora import LoraLinear, LoraLinearFn
from slimtune.quant import Linear4bit
from slimtune.quant.linear4bit import Linear4bitFn

F64 = dict(dtype=torch.float64)


def _t(*shape, grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, **F64).requires_grad_(grad)


def _norm(n=5, seed=9):
    return torch.rand(n, generator=torch.Generator().manual_seed(seed), **F64) + 0.5


# every input that may need a gradient, on or off: (x, base_out) pairs and the parameters
GRAD_CASES = [(True, True, True), (False, True, True), (True, False, True), (False, False, True)]


@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("need_x,need_out,need_params", GRAD_CASES)
def test_lora_fn(p, need_x, need_out, need_params):
    x, out = _t(3, 2, 6, grad=need_x), _t(3, 2, 5, grad=need_out, seed=1)
    A, B = _t(2, 6, grad=need_params, seed=2), _t(5, 2, grad=need_params, seed=3)
    assert torch.autograd.gradcheck(lambda *a: LoraLinearFn.apply(*a, 0.7, p, 11), (x, out, A, B))


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("need_x,need_out,need_params", GRAD_CASES)
def test_dora_fn(with_bias, need_x, need_out, need_params):
    x, out = _t(3, 2, 6, grad=need_x), _t(3, 2, 5, grad=need_out, seed=1)
    A, B, m = _t(2, 6, grad=need_params, seed=2), _t(5, 2, grad=need_params, seed=3), _t(5, seed=4)
    bias = _t(5, seed=5) if with_bias else None
    fn = lambda x, o, a, b, m, bias: DoraLinearFn.apply(x, o, a, b, m, _norm(), bias, 0.6)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, out, A, B, m, bias))


@pytest.mark.parametrize("need_w", [False, True])
@pytest.mark.parametrize("need_x,need_out,need_params", GRAD_CASES)
def test_dora_dropout_fn_float_base(need_w, need_x, need_out, need_params):
    x, out = _t(3, 2, 6, grad=need_x), _t(3, 2, 5, grad=need_out, seed=1)
    A, B, m = _t(2, 6, grad=need_params, seed=2), _t(5, 2, grad=need_params, seed=3), _t(5, seed=4)
    W = _t(5, 6, grad=need_w, seed=6)
    fn = lambda x, o, a, b, m, w: DoraDropoutFn.apply(x, o, a, b, m, _norm(), w, 0.6, 0.3, 5, None)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, out, A, B, m, W))


def _q4(out_f=5, in_f=6, bias=True):
    torch.manual_seed(0)
    return Linear4bit.from_linear(nn.Linear(in_f, out_f, bias=bias), block_size=64)


@pytest.mark.parametrize("need_x", [True, False])
def test_dora_dropout_fn_4bit_base(need_x):
    q = _q4()
    x, out = _t(3, 2, 6, grad=need_x), _t(3, 2, 5, seed=1)
    A, B, m = _t(2, 6, seed=2), _t(5, 2, seed=3), _t(5, seed=4)
    fn = lambda x, o, a, b, m: DoraDropoutFn.apply(x, o, a, b, m, _norm(), None, 0.6, 0.3, 5, q)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, out, A, B, m))


@pytest.mark.parametrize("need_x,need_bias", [(True, True), (True, False), (False, True)])
def test_linear4bit_fn(need_x, need_bias):
    q = _q4(7, 6)
    x, bias = _t(3, 2, 6, grad=need_x), _t(7, grad=need_bias, seed=1)
    assert torch.autograd.gradcheck(lambda x, b: Linear4bitFn.apply(x, b, q), (x, bias))
    assert torch.autograd.gradcheck(lambda x: Linear4bitFn.apply(x, None, q), (_t(4, 6),))


def _conv1d(d_in=6, d_out=5):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = Conv1D(d_out, d_in).double()  # weight stored (d_in, d_out)
    nn.init.normal_(base.weight)
    nn.init.normal_(base.bias)
    return base


def _layer_fn(layer: AdaptedLayer, names: tuple[str, ...]):
    """The wrapped layer as a function of x and the named parameters, with a fixed dropout seed."""
    def fn(x, *params):
        torch.manual_seed(0)  # same mask in every evaluation
        return functional_call(layer, dict(zip(names, params)), (x,))
    return fn


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("base_kind", ["linear", "conv1d"])
def test_lora_layer_with_trainable_bias(dropout, base_kind):
    base = _conv1d() if base_kind == "conv1d" else nn.Linear(6, 5).double()
    layer = AdaptedLayer(base)
    layer.add("a", LoraLinear(6, 5, 2, 4.0, dropout, fan_in_fan_out=base_kind == "conv1d").double())
    nn.init.normal_(layer.adapters["a"].lora_B)
    names = ("adapters.a.lora_A", "adapters.a.lora_B", "base_layer.bias")
    params = [layer.get_parameter(n).detach().clone().requires_grad_() for n in names]
    assert torch.autograd.gradcheck(_layer_fn(layer.train(), names), (_t(3, 6), *params))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("base_kind", ["linear", "conv1d", "4bit"])
def test_dora_layer_with_trainable_bias(dropout, base_kind):
    # The norm ||W0 + sBA|| is detached (as in the DoRA paper and PEFT), so gradcheck's finite differences
    # hold only for inputs it does not depend on: x, the magnitude and the bias (A, B: test_dora_fn).
    base = {"linear": lambda: nn.Linear(6, 5).double(), "conv1d": _conv1d, "4bit": lambda: _q4(5, 6)}[base_kind]()
    if base_kind == "4bit":
        base.bias.data = base.bias.data.double()
    layer = AdaptedLayer(base)
    dora = DoraLinear(base, 2, 4.0, dropout, fan_in_fan_out=base_kind == "conv1d").double()
    layer.add("a", dora)
    nn.init.normal_(dora.lora_B)
    names = ("adapters.a.magnitude", "base_layer.bias")
    params = [layer.get_parameter(n).detach().clone().requires_grad_() for n in names]
    fn = _layer_fn(layer.train(), names)
    if base_kind == "4bit":  # the 4-bit layer computes in float32: the bias and magnitude only, with a
        x = _t(3, 6, grad=False)  # step the fp32 rounding cannot hide (the output is linear in both)
        assert torch.autograd.gradcheck(lambda *p: fn(x, *p), params, eps=1e-2, atol=1e-4, rtol=1e-3)
    else:
        assert torch.autograd.gradcheck(fn, (_t(3, 6), *params))
