"""DoRA on nn.Conv1d / nn.Conv2d (slimtune.layers.dora_conv.DoraConv) against Hugging Face PEFT's
DoraConv{1,2}dLayer on the conv toy: outputs, gradients, dropout, merging, files, bf16 autocast."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import slimtune
from slimtune import LoraConfig, inject, load_adapter, save_adapter
from slimtune.control import adapted_layers
from slimtune.layers.dora_conv import MAGNITUDE_KEY, DoraConv
from tests.conftest import ConvToy, randomize_adapters

peft = pytest.importorskip("peft")

TARGETS = ("conv1", "conv2", "seq")  # 3x3 Conv2d (padding), 1x1 Conv2d, Conv1d
LEAF_TO_PEFT = {"lora_A": "lora_A.default.weight", "lora_B": "lora_B.default.weight",
                "magnitude": "lora_magnitude_vector.default.weight"}


def images(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(seed))


def randomize_dora(model: nn.Module, seed: int = 1) -> None:
    """Random A, B and magnitudes near the real channel norms (a random m would dwarf the base)."""
    randomize_adapters(model, std=0.2, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            for a in layer.adapters.values():
                a.magnitude.copy_(a.norm(layer.base_layer) * (1 + 0.3 * torch.rand(a.magnitude.shape, generator=g)))


def dora_toy(**lora) -> nn.Module:
    model = ConvToy().eval()
    inject(model, LoraConfig(**(dict(r=2, alpha=6, target_modules=TARGETS, use_dora=True) | lora)))
    randomize_dora(model)
    return model


def peft_twin(ours: nn.Module, **lora) -> nn.Module:
    """PEFT's DoRA on a fresh conv toy holding ``ours``'s A, B and m (m in PEFT's (1, c_out, 1..) layout)."""
    cfg = dict(r=2, lora_alpha=6, target_modules=list(TARGETS), use_dora=True) | lora
    theirs = peft.get_peft_model(ConvToy(), peft.LoraConfig(**cfg)).eval()
    params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad:  # A, B, m, and with bias="lora_only" the (randomized) base biases
                target = params[f"base_model.model.{peft_name(name)}"]
                target.copy_(p.view_as(target))
    return theirs


def peft_name(name: str) -> str:
    """slimtune's parameter name as PEFT's (without ``base_model.model.``): ``conv1.adapters.default.lora_A`` ->
    ``conv1.lora_A.default.weight``; other names (``conv1.base_layer.bias``) are the same in both."""
    module, sep, leaf = name.partition(".adapters.default.")
    return f"{module}.{LEAF_TO_PEFT[leaf]}" if sep else name


def grads(model: nn.Module, out: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """Trainable-parameter gradients of <out, g>, keyed by PEFT's names, each flattened."""
    out.backward(g)
    got = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            got[peft_name(name.removeprefix("base_model.model."))] = p.grad.flatten()
    return got


@pytest.mark.parametrize("lora", [{}, dict(use_rslora=True, r=4), dict(bias="lora_only")],
                         ids=["plain", "rslora", "trainable-bias"])
def test_outputs_and_gradients_equal_peft(lora):
    peft_kw = {"use_rslora": True, "r": 4} if "use_rslora" in lora else {}
    if "bias" in lora:
        peft_kw["bias"] = "lora_only"
    ours = dora_toy(**lora)
    assert {type(layer.adapters["default"]) for _, layer in adapted_layers(ours)} == {DoraConv}
    theirs = peft_twin(ours, **peft_kw)
    x = images()
    out, ref = ours(x), theirs(x)
    assert not torch.allclose(out, ConvToy()(x), atol=1e-3)  # the adapter does something
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    got, want = grads(ours, out, g), grads(theirs, ref, g)
    assert got.keys() == want.keys() and len(got) == 9 + (3 if "bias" in lora else 0)
    for name in want:
        assert want[name].abs().max() > 0, name
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_dropout_in_training_equals_peft_with_the_same_random_numbers():
    # both draw one nn.Dropout mask per layer on x, in the same order: the same seed gives the same masks
    ours, x = dora_toy(dropout=0.3), images()
    theirs = peft_twin(ours, lora_dropout=0.3)
    ours.train()
    theirs.train()
    torch.manual_seed(11)
    out = ours(x)
    torch.manual_seed(11)
    ref = theirs(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.manual_seed(12)
    assert not torch.allclose(ours(x), out, atol=1e-4)  # dropout really is on
    ours.zero_grad()
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    got, want = grads(ours, out, g), grads(theirs, ref, g)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_step0_equals_the_base_and_peft():
    base, x = ConvToy().eval(), images()
    model = copy.deepcopy(base)
    inject(model, LoraConfig(r=2, alpha=6, target_modules=TARGETS, use_dora=True))
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x), atol=0, rtol=0)
        for _, layer in adapted_layers(model):  # m = ||W0|| per output channel (B = 0), PEFT's init
            W0 = layer.base_layer.weight
            torch.testing.assert_close(layer.adapters["default"].magnitude, W0.flatten(1).norm(dim=1))
        torch.testing.assert_close(model(x), peft_twin(model)(x), atol=1e-6, rtol=1e-6)


def test_merge_unmerge_exact_idempotent_and_equal_to_peft_merge():
    model, x = dora_toy(), images()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    before = model(x).detach()
    theirs = peft_twin(model)
    slimtune.merge(model)
    slimtune.merge(model)  # idempotent
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
    merged_theirs = theirs.merge_and_unload().state_dict()
    for name, layer in adapted_layers(model):
        torch.testing.assert_close(layer.base_layer.weight, merged_theirs[f"{name}.weight"], atol=1e-6, rtol=1e-5)
    slimtune.unmerge(model)
    slimtune.unmerge(model)
    for n, p in model.named_parameters():
        if n in w0:
            torch.testing.assert_close(p, w0[n], atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-6, rtol=1e-6)


def test_delta_weight_is_the_merged_kernel_less_w0():
    model = dora_toy()
    for _, layer in adapted_layers(model):
        a, W0 = layer.adapters["default"], layer.base_layer.weight.detach().clone()
        delta = a.delta_weight(layer.base_layer)
        V = W0 + a.scale * torch.einsum("or,ri...->oi...", a.lora_B.detach().flatten(1), a.lora_A.detach())
        want = a.magnitude.detach().view(-1, *(1,) * (W0.dim() - 1)) / V.flatten(1).norm(dim=1).view(
            -1, *(1,) * (W0.dim() - 1)) * V - W0  # the paper's W' = m V / ||V||, per output channel
        torch.testing.assert_close(delta, want, atol=1e-6, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:.*vLLM will not load")
def test_slimtune_folder_loads_in_peft_and_peft_folder_loads_in_slimtune(tmp_path):
    ours, x = dora_toy(), images()
    save_adapter(ours, tmp_path / "ours")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ours" / "adapter_model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys() if k.endswith(MAGNITUDE_KEY)}
    assert shapes == {"base_model.model.conv1.lora_magnitude_vector": (1, 8, 1, 1),
                      "base_model.model.conv2.lora_magnitude_vector": (1, 8, 1, 1),
                      "base_model.model.seq.lora_magnitude_vector": (1, 8, 1)}  # PEFT's layout
    theirs = peft.PeftModel.from_pretrained(ConvToy(), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x), atol=1e-5, rtol=1e-5)

    peft_model = peft.get_peft_model(ConvToy(), peft.LoraConfig(r=2, lora_alpha=5, target_modules=list(TARGETS),
                                                                use_dora=True, init_lora_weights=False)).eval()
    peft_model.save_pretrained(tmp_path / "theirs")
    loaded = ConvToy().eval()
    report = load_adapter(loaded, tmp_path / "theirs")
    assert report.trainable_params == peft_model.get_nb_trainable_parameters()[0]
    with torch.no_grad():
        assert not torch.allclose(peft_model(x), ConvToy()(x), atol=1e-3)
        torch.testing.assert_close(loaded(x), peft_model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_bf16_autocast_forward_and_backward_track_fp32(device):
    ref, x = dora_toy().to(device), images().to(device)
    fast = copy.deepcopy(ref)
    want_out = ref(x)
    want_out.square().mean().backward()
    with torch.autocast(device, dtype=torch.bfloat16):
        out = fast(x)
    out.float().square().mean().backward()
    torch.testing.assert_close(out.float(), want_out, atol=0.05, rtol=0.05)
    want = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    got = {n: p.grad for n, p in fast.named_parameters() if p.requires_grad}
    assert got.keys() == want.keys() and len(want) == 9
    for n in want:
        assert got[n].dtype == torch.float32 and want[n].norm() > 0, n
        assert (got[n] - want[n]).norm() < 0.05 * want[n].norm(), n


def test_bf16_base_trains_with_fp32_adapters():
    model = ConvToy().eval().to(torch.bfloat16)
    inject(model, LoraConfig(r=2, alpha=6, target_modules=TARGETS, use_dora=True))
    a = model.conv1.adapters["default"]
    assert a.magnitude.dtype == torch.float32  # adapter_dtype float32 by default, as PEFT
    x = images().to(torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ConvToy().to(torch.bfloat16)(x), atol=0, rtol=0)
    model(x).float().square().mean().backward()
    assert a.magnitude.grad is not None and torch.isfinite(a.magnitude.grad).all()


def test_magnitude_of_the_wrong_shape_is_a_named_error_and_nothing_is_copied():
    a = dora_toy().conv1.adapters["default"]
    before = {k: t.detach().clone() for k, t in a.file_tensors().items()}
    tensors = {k: t.detach().clone() + 1 for k, t in a.file_tensors().items()}
    tensors[MAGNITUDE_KEY] = torch.ones(1, 9, 1, 1)
    with pytest.raises(ValueError, match=r"lora_magnitude_vector: file has shape \(1, 9, 1, 1\), this layer "
                                         r"needs \(1, 8, 1, 1\)"):
        a.load_file_tensors(tensors)
    for k, t in a.file_tensors().items():
        assert torch.equal(t, before[k]), k
    tensors[MAGNITUDE_KEY] = torch.arange(8.0)  # the (c_out,) layout is taken too
    a.load_file_tensors(tensors)
    assert torch.equal(a.magnitude, torch.arange(8.0))


def test_dora_and_principal_inits_keep_their_limits():
    with pytest.raises(TypeError, match=r"lora.init='pissa': supported on linear layers only; conv1 is a Conv2d"):
        inject(ConvToy(), LoraConfig(target_modules=("conv1",), init="pissa", use_dora=True))
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match=r"Conv2d with groups=2: LoRA supports groups=1 only"):
        inject(grouped, LoraConfig(target_modules=("0",), use_dora=True))
    assert isinstance(grouped[0], nn.Conv2d) and not hasattr(grouped, "slimtune_configs")  # untouched
