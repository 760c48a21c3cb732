"""LoRA layers against the formula h = W0 x + s B A x, and the fused autograd against plain autograd."""

import pytest
import torch
from torch import nn

from slimtune.layers.base import AdaptedLayer
from slimtune.layers.lora import LoraConv, LoraEmbedding, LoraLinear, LoraLinearFn, drop_probability, keep_mask


def _wrapped_linear(d_in=16, d_out=12, r=4, alpha=8.0, dropout=0.0, **kw):
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out)
    layer = AdaptedLayer(base)
    layer.add("a", LoraLinear(d_in, d_out, r, alpha, dropout, **kw))
    return layer


def test_step0_output_equals_base_exactly():
    layer = _wrapped_linear()
    x = torch.randn(3, 5, 16)
    assert torch.equal(layer(x), layer.base_layer(x))


def test_forward_matches_lora_formula():
    layer = _wrapped_linear(r=4, alpha=8.0).eval()
    ad = layer.adapters["a"]
    nn.init.normal_(ad.lora_B)
    x = torch.randn(3, 5, 16)
    W0, b = layer.base_layer.weight, layer.base_layer.bias
    expected = x @ W0.T + b + (8.0 / 4) * (x @ ad.lora_A.T @ ad.lora_B.T)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_rslora_scale():
    assert LoraLinear(4, 4, r=16, alpha=8, use_rslora=True).scale == pytest.approx(8 / 4)
    assert LoraLinear(4, 4, r=16, alpha=8).scale == pytest.approx(0.5)


def test_gaussian_init_std_is_one_over_r():
    a = LoraLinear(4096, 8, r=8, alpha=8, init="gaussian").lora_A
    assert a.std().item() == pytest.approx(1 / 8, rel=0.02)
    assert torch.count_nonzero(LoraLinear(64, 8, r=8, alpha=8, init="gaussian").lora_B) == 0


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_fused_gradients_equal_plain_autograd(p):
    torch.manual_seed(0)
    x = torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True)
    base_out = torch.randn(2, 7, 12, dtype=torch.float64, requires_grad=True)
    A = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    B = torch.randn(12, 4, dtype=torch.float64, requires_grad=True)
    seed, scale = 1234, 1.7
    out = LoraLinearFn.apply(x, base_out, A, B, scale, p, seed)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, base_out, A, B), g)

    keep = keep_mask(x.detach().reshape(-1, 16), p, seed).view_as(x) if p else torch.ones_like(x)
    ref = base_out + scale * ((x * keep / (1 - drop_probability(p))) @ A.T @ B.T)
    ref_grads = torch.autograd.grad(ref, (x, base_out, A, B), g)
    torch.testing.assert_close(out, ref)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


def test_dropout_is_active_in_train_and_off_in_eval():
    # eval: exactly the LoRA formula; train: the formula on dropout(x), with the keep-mask drawn from the
    # seed that torch's global generator hands the layer, rescaled by 1/(1-p)
    layer = _wrapped_linear(dropout=0.5)
    ad = layer.adapters["a"]
    nn.init.normal_(ad.lora_B)
    x = torch.randn(4, 16)
    W0, b, s = layer.base_layer.weight, layer.base_layer.bias, ad.scale
    with torch.no_grad():
        torch.testing.assert_close(layer.eval()(x), x @ W0.T + b + s * (x @ ad.lora_A.T @ ad.lora_B.T))
        torch.manual_seed(3)
        seed = int(torch.randint(0, 2**62, (1,)).item())
        xd = x * keep_mask(x, 0.5, seed) / (1 - drop_probability(0.5))
        torch.manual_seed(3)
        train_out = layer.train()(x)
    torch.testing.assert_close(train_out, x @ W0.T + b + s * (xd @ ad.lora_A.T @ ad.lora_B.T))
    assert not torch.allclose(train_out, layer.eval()(x))


def _saved_bytes(fn):
    """Bytes of unique storages saved for backward while fn() runs."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_dropout_saves_no_copy_of_the_input():
    # PEFT's nn.Dropout keeps a dropped fp32 copy of x (4 bytes per element); on CPU only a 1-byte keep-mask
    # is saved, and on CUDA nothing (the mask is regenerated from its seed in backward)
    torch.manual_seed(0)
    x = torch.randn(64, 256, requires_grad=True)
    no_drop, drop = _wrapped_linear(256, 256, r=8).train(), _wrapped_linear(256, 256, r=8, dropout=0.1).train()
    assert _saved_bytes(lambda: drop(x)) == _saved_bytes(lambda: no_drop(x)) + x.numel()
    # what plain autograd would keep: the dropped copy of x (64 x 256 fp32) and its mask on top
    assert _saved_bytes(lambda: drop(x)) < 64 * 256 * 4 * 2 + 64 * 8 * 4 + 256 * 8 * 4 + 256 * 256 * 4 + 10_000


def test_embedding_step0_and_merge_consistency():
    torch.manual_seed(0)
    base = nn.Embedding(50, 8, padding_idx=0)
    layer = AdaptedLayer(base)
    ad = LoraEmbedding(50, 8, r=4, alpha=8)
    layer.add("a", ad)
    ids = torch.randint(0, 50, (3, 6))
    assert torch.equal(layer(ids), base(ids))
    nn.init.normal_(ad.lora_A)
    unmerged = layer(ids)
    layer.merge(("a",))
    torch.testing.assert_close(layer(ids), unmerged)


@pytest.mark.parametrize("conv", [nn.Conv2d(3, 6, 3, padding=1, stride=2), nn.Conv2d(3, 6, 1),
                                  nn.Conv1d(3, 6, 5, padding=2, dilation=1), nn.Conv2d(3, 6, 3, dilation=2)])
def test_conv_merge_equals_adapter_path(conv):
    layer = AdaptedLayer(conv)
    ad = LoraConv(conv, r=2, alpha=4)
    layer.add("a", ad)
    x = torch.randn(2, 3, 9, 9) if isinstance(conv, nn.Conv2d) else torch.randn(2, 3, 11)
    assert torch.equal(layer(x), conv(x))
    nn.init.normal_(ad.lora_B)
    unmerged = layer(x)
    layer.merge(("a",))
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-4, atol=1e-5)


def test_grouped_conv_is_refused_clearly():
    with pytest.raises(ValueError, match="groups=2: LoRA supports groups=1 only"):
        LoraConv(nn.Conv2d(4, 4, 3, groups=2), r=2, alpha=2)


def test_merge_is_idempotent_and_unmerge_restores():
    layer = _wrapped_linear()
    nn.init.normal_(layer.adapters["a"].lora_B)
    w0 = layer.base_layer.weight.detach().clone()
    layer.merge(("a",))
    once = layer.base_layer.weight.detach().clone()
    layer.merge(("a",))
    assert torch.equal(layer.base_layer.weight, once) and layer.merged == ("a",)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=0, atol=1e-6)
    layer.unmerge()
    assert layer.merged == ()


def testkeep_mask_drops_at_rate_p_and_is_reproducible_from_its_seed():
    x2 = torch.empty(400, 500)
    keep = keep_mask(x2, 0.1, 99)
    assert keep.dtype == torch.bool
    assert abs(keep.float().mean().item() - 0.9) < 0.005  # 200k draws: sd ~ 0.0007
    assert drop_probability(0.1) == pytest.approx(0.1, abs=1e-5) and drop_probability(0.25) == 0.25
    odd = keep_mask(torch.empty(7, 3), 0.5, 1)  # an element count that is not a multiple of 4
    assert odd.shape == (7, 3)
    assert torch.equal(keep, keep_mask(x2, 0.1, 99))
    assert not torch.equal(keep, keep_mask(x2, 0.1, 100))


@pytest.mark.parametrize("save_mask", [True, False])
def test_saved_and_regenerated_masks_give_the_same_gradients(monkeypatch, save_mask):
    # CPU saves the keep-mask; CUDA regenerates it from its seed. Both paths, checked on CPU.
    import slimtune.layers.lora as lora

    monkeypatch.setattr(lora, "SAVE_MASK_ON", ("cpu",) if save_mask else ())
    test_fused_gradients_equal_plain_autograd(0.3)
    x = torch.randn(64, 256, requires_grad=True)
    no_drop, drop = _wrapped_linear(256, 256, r=8).train(), _wrapped_linear(256, 256, r=8, dropout=0.1).train()
    extra = _saved_bytes(lambda: drop(x)) - _saved_bytes(lambda: no_drop(x))
    assert extra == (x.numel() if save_mask else 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_dropout_regenerates_the_mask_and_matches_autograd():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 16, device="cuda", requires_grad=True)
    base_out = torch.randn(2, 7, 12, device="cuda", requires_grad=True)
    A = torch.randn(4, 16, device="cuda", requires_grad=True)
    B = torch.randn(12, 4, device="cuda", requires_grad=True)
    out = LoraLinearFn.apply(x, base_out, A, B, 1.5, 0.3, 11)
    keep = keep_mask(x.detach().reshape(-1, 16), 0.3, 11).view_as(x)
    ref = base_out + 1.5 * ((x * keep / (1 - drop_probability(0.3))) @ A.T @ B.T)
    g = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, (x, A, B), g), torch.autograd.grad(ref, (x, A, B), g)):
        torch.testing.assert_close(got, want)
