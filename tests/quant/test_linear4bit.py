"""The frozen 4-bit layer: maths, memory saved for backward, bitsandbytes' layout both ways, LoRA on top."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import slimtune
from slimtune.quant import Linear4bit, dequantize_model, quantize_model

bnb = pytest.importorskip("bitsandbytes")


def tokens(batch: int = 2, seq: int = 12) -> torch.Tensor:
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(0))


def randomize_adapters(model: torch.nn.Module, std: float = 0.1) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _layer(out_f=70, in_f=130, bias=True, seed=0, **kw) -> tuple[torch.nn.Linear, Linear4bit]:
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f, bias=bias)
    return lin, Linear4bit.from_linear(lin, **kw)


def test_forward_backward_use_dequantized_weight():
    _, q = _layer()
    w = q.dequantize()
    assert q.weight.dtype == torch.uint8 and w.shape == (70, 130) and not w.requires_grad
    x = torch.randn(2, 5, 130, requires_grad=True)
    y = q(x)
    torch.testing.assert_close(y, F.linear(x, w, q.bias), rtol=0, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ w, rtol=0, atol=1e-6)
    # a trainable bias (bias="all") gets the plain sum of the output gradient
    torch.testing.assert_close(q.bias.grad, g.sum((0, 1)), rtol=1e-6, atol=1e-6)


def test_backward_saves_nothing_weight_sized():
    _, q = _layer(out_f=512, in_f=512)
    x = torch.randn(4, 512, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        q(x).sum().backward()
    assert all(n < 512 * 512 for n in saved), saved


@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_compute_dtype(compute_dtype):
    _, q = _layer(compute_dtype=compute_dtype)
    x = torch.randn(3, 130)
    y = q(x)
    assert y.dtype == torch.float32  # output comes back in the input's dtype
    ref = F.linear(x.to(compute_dtype), q.dequantize(), q.bias.to(compute_dtype)).float()
    torch.testing.assert_close(y, ref)


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_autocast_forward_and_backward_match_nn_linear_maths(compute_dtype):
    # under autocast the layer computes as an nn.Linear would (bf16 matmul), in forward and backward
    _, q = _layer(compute_dtype=compute_dtype)
    q.bias.requires_grad_(True)
    x = torch.randn(2, 5, 130, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = q(x)
    g = torch.randn(y.shape)
    y.backward(g.to(y.dtype))
    xb, wb, bb = x.detach().bfloat16(), q.dequantize(torch.bfloat16), q.bias.detach().bfloat16()
    torch.testing.assert_close(y.float(), F.linear(xb, wb, bb).float(), rtol=0, atol=0)
    gb = g.to(y.dtype).bfloat16()
    torch.testing.assert_close(x.grad, (gb @ wb).float(), rtol=0, atol=0)
    # summed over tokens in fp32, then stored in the bias's dtype
    torch.testing.assert_close(q.bias.grad, gb.float().sum((0, 1)).to(q.bias.dtype), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("block_size", [64, 256])
def test_state_dict_round_trip_with_bitsandbytes(double_quant, block_size):
    lin, ours = _layer(block_size=block_size, double_quant=double_quant)
    x = torch.randn(4, 130)
    # ours -> bitsandbytes
    sd = ours.state_dict()
    expected = {"weight", "bias", "weight.absmax", "weight.quant_map", "weight.quant_state.bitsandbytes__nf4"}
    if double_quant:
        expected |= {"weight.nested_absmax", "weight.nested_quant_map"}
    assert set(sd) == expected
    stats = {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}
    theirs = bnb.nn.Linear4bit(130, 70, compute_dtype=torch.float32, quant_type="nf4")
    theirs.weight = bnb.nn.Params4bit.from_prequantized(data=sd["weight"], quantized_stats=stats, device="cpu")
    theirs.bias = torch.nn.Parameter(sd["bias"])
    assert torch.equal(theirs(x), ours(x))
    # bitsandbytes -> ours (an empty layer with the other settings takes the checkpoint's)
    bq = bnb.nn.Linear4bit(130, 70, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=double_quant)
    bq.weight.blocksize = block_size
    bq.load_state_dict(lin.state_dict())
    bq = bq.to("cpu")
    loaded = Linear4bit(130, 70, double_quant=not double_quant)
    loaded.load_state_dict(bq.state_dict())
    assert loaded.block_size == block_size and loaded.double_quant == double_quant
    assert torch.equal(loaded.dequantize(), ours.dequantize())
    assert torch.equal(loaded(x), bq(x))


def test_load_errors_name_the_problem():
    _, q = _layer()
    sd = q.state_dict()
    with pytest.raises(RuntimeError, match=r"shape=\[70, 130\]: this layer is \[70, 129\]"):
        Linear4bit(129, 70).load_state_dict(sd)
    bad = dict(sd)
    del bad["weight.absmax"]
    with pytest.raises(RuntimeError, match="weight.absmax: missing"):
        Linear4bit(130, 70).load_state_dict(bad)
    fp4 = bnb.nn.Linear4bit(130, 70, quant_type="fp4")
    fp4.load_state_dict(torch.nn.Linear(130, 70).state_dict())
    with pytest.raises(RuntimeError, match="quant_type='fp4'"):
        Linear4bit(130, 70).load_state_dict(fp4.to("cpu").state_dict())
    with pytest.raises(ValueError, match="in_features=0: must be a positive integer"):
        Linear4bit(0, 3)
    with pytest.raises(ValueError, match="compute_dtype=torch.int8"):
        Linear4bit(4, 3, compute_dtype=torch.int8)


def test_plain_linear_state_dict_is_quantized_on_load():
    lin, q = _layer()
    fresh = Linear4bit(130, 70)
    fresh.load_state_dict(lin.state_dict())
    assert torch.equal(fresh.dequantize(), q.dequantize())


def test_lora_wraps_4bit_layers_and_trains_only_adapters(llama):
    report = quantize_model(llama)
    assert "lm_head" in report.kept and len(report.quantized) == 14
    inj = slimtune.inject(llama, slimtune.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    assert len(inj.wrapped) == 14 and all(w.kind == "Linear4bit" for w in inj.wrapped)
    before = {n: p.detach().clone() for n, p in llama.state_dict().items()}
    opt = torch.optim.AdamW([p for p in llama.parameters() if p.requires_grad], lr=1e-2)
    x = tokens()
    for _ in range(2):
        llama(x, labels=x).loss.backward()
        opt.step(), opt.zero_grad()
    changed = {n for n, t in llama.state_dict().items() if not torch.equal(t, before[n])}
    assert changed and all("lora_" in n for n in changed)


def test_dequantize_then_merge_matches_adapted_model(llama):
    quantize_model(llama)
    slimtune.inject(llama, slimtune.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    randomize_adapters(llama)
    x = tokens()
    with torch.no_grad():
        ref = llama(x).logits
    with pytest.raises(TypeError, match="dequantize_model"):
        slimtune.merge(llama)
    names = dequantize_model(llama, torch.float32)
    assert len(names) == 14
    merged = slimtune.merge_and_unload(llama)
    assert not any(isinstance(m, Linear4bit) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, ref, rtol=1e-4, atol=1e-4)


def test_module_to_moves_statistics(llama):
    quantize_model(llama)
    copy.deepcopy(llama).to(torch.device("meta"))  # every statistic is a registered buffer
    layer = llama.model.layers[0].mlp.up_proj
    assert {n for n, _ in layer.named_buffers()} == {"absmax", "quant_map", "nested_absmax", "nested_quant_map",
                                                     "offset"}



def test_injection_report_counts_quantized_weights_as_weights_not_bytes():
    import slimtune
    from tests.conftest import tiny_llama

    plain, quant = tiny_llama(), tiny_llama()
    slimtune.quantize_model(quant)
    a = slimtune.inject(plain, slimtune.LoraConfig(r=4, target_modules="all-linear"))
    b = slimtune.inject(quant, slimtune.LoraConfig(r=4, target_modules="all-linear"))
    assert b.trainable_params == a.trainable_params and b.total_params == a.total_params


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", [(48, 64), (37, 100), (576, 1536), (1, 33)])
def test_layer_bytes_equal_the_memory_formula(shape, double_quant):
    # the estimator's per-layer NF4 bytes must be what a Linear4bit really keeps (shared maps apart)
    from slimtune.memory.formulas import nf4_layer_bytes

    layer = Linear4bit.from_linear(torch.nn.Linear(shape[1], shape[0], bias=False), double_quant=double_quant)
    shared = {"quant_map", "nested_quant_map"}
    tensors = [layer.weight] + [b for n, b in layer.named_buffers() if n not in shared]
    held = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())
    assert held == nf4_layer_bytes(shape[0] * shape[1], double_quant=double_quant)


# -- module dtype casts (model.to(torch.bfloat16) after quantize_model) -----------------------------

@pytest.mark.parametrize("cast", ["to_bf16", "half"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_dtype_cast_keeps_statistics_and_matches_bitsandbytes(cast, double_quant):
    # bitsandbytes keeps its statistics outside the module's buffers, so a cast leaves them (and its
    # compute_dtype) alone and casts only the bias; ours must do the same, and still export its layout
    _, q = _layer(double_quant=double_quant)
    stats = {n: b.clone() for n, b in q.named_buffers()}
    w = q.dequantize()
    dtype = torch.bfloat16 if cast == "to_bf16" else torch.float16
    q = q.to(dtype) if cast == "to_bf16" else q.half()
    for n, b in q.named_buffers():
        assert b.dtype == stats[n].dtype and torch.equal(b, stats[n]), n
    assert torch.equal(q.dequantize(), w) and q.compute_dtype == torch.float32 and q.bias.dtype == dtype
    x = torch.randn(4, 130).to(dtype)
    y = q(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y, F.linear(x.float(), w, q.bias.float()).to(dtype), rtol=0, atol=0)
    sd = q.state_dict()
    theirs = bnb.nn.Linear4bit(130, 70, compute_dtype=torch.float32, quant_type="nf4")
    theirs.weight = bnb.nn.Params4bit.from_prequantized(
        data=sd["weight"], quantized_stats={k[7:]: v for k, v in sd.items() if k.startswith("weight.")},
        device="cpu")
    theirs.bias = torch.nn.Parameter(sd["bias"])
    assert torch.equal(theirs(x), y)


def test_bf16_compute_layer_cast_to_bf16_is_dequantize_then_linear():
    _, q = _layer(compute_dtype=torch.bfloat16)
    w, b = q.dequantize(torch.bfloat16), q.bias.detach().bfloat16()
    q.to(torch.bfloat16)
    x = torch.randn(2, 5, 130, dtype=torch.bfloat16)
    torch.testing.assert_close(q(x), F.linear(x, w, b), rtol=0, atol=0)


def test_model_cast_to_bf16_after_quantize_model(llama):
    report = quantize_model(llama)
    layers = {n: (m, m.dequantize()) for n, m in llama.named_modules() if isinstance(m, Linear4bit)}
    llama.to(torch.bfloat16)
    for n, (m, w) in layers.items():
        assert torch.equal(m.dequantize(), w), n
    maps = {id(m.quant_map) for m, _ in layers.values()}
    assert len(maps) == 1  # the NF4 levels are still held once, not once per layer
    assert slimtune.quant.measure(llama).quantized_bytes == report.quantized_bytes
    llama.to("cpu")  # a device move still works
    logits = llama(tokens()).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
