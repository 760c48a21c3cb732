"""DoRA on a diffusers UNet's Conv2d targets (conv1, conv2, conv_shortcut, proj_in/proj_out) with its attention:
against PEFT (outputs, gradients, merge) and through files diffusers loads (load_lora_adapter,
pipeline.load_lora_weights), both ways."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open

import slimtune
from slimtune import diffusion
from slimtune.control import adapted_layers
from slimtune.files.diffusers_keys import DIFFUSERS_WEIGHTS_NAME
from slimtune.layers.dora_conv import DoraConv

from .conftest import tiny_pipeline, tiny_unet, unet_inputs, unet_out
from .test_inject import peft_twin

TOL = dict(atol=1e-5, rtol=1e-5)
TARGETS = diffusion.UNET_ATTENTION + diffusion.UNET_CONV
pytestmark = pytest.mark.filterwarnings("ignore:.*vLLM will not load")


def randomize_dora(model, seed: int = 1) -> None:
    """Random A, B (std 0.3) and magnitudes near the real norms (a random m would dwarf the base)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            for a in layer.adapters.values():
                a.lora_A.copy_(torch.randn(a.lora_A.shape, generator=g) * 0.1)
                a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g) * 0.1)
                norm = a.norm(layer.base_layer) if isinstance(a, DoraConv) else a.factored_norm(layer.base_layer)
                a.magnitude.copy_(norm * (1 + 0.1 * torch.rand(a.magnitude.shape, generator=g)))


def dora_unet(**lora):
    unet = tiny_unet()
    slimtune.inject(unet, slimtune.LoraConfig(**(dict(r=4, alpha=8, target_modules=TARGETS, use_dora=True) | lora)))
    randomize_dora(unet)
    return unet


def test_step0_equals_the_base_with_conv_targets():
    unet = tiny_unet()
    report = slimtune.inject(unet, slimtune.LoraConfig(r=4, alpha=8, target_modules=TARGETS, use_dora=True))
    convs = [w.name for w in report.wrapped if w.kind == "Conv2d"]
    assert {n.rsplit(".", 1)[-1] for n in convs} == {"conv1", "conv2", "conv_shortcut", "proj_in", "proj_out"}
    torch.testing.assert_close(unet_out(unet), unet_out(tiny_unet()), atol=0, rtol=0)


def test_unet_outputs_gradients_and_merge_equal_peft():
    base = tiny_unet()
    unet = dora_unet()
    twin = peft_twin(base, unet, dict(r=4, lora_alpha=8, target_modules=list(TARGETS), use_dora=True))
    out, ref = unet(*unet_inputs()).sample, twin(*unet_inputs()).sample
    assert not torch.allclose(out, unet_out(base), atol=1e-3)
    torch.testing.assert_close(out, ref, **TOL)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    out.backward(g)
    ref.backward(g)
    theirs = {n: p.grad for n, p in twin.named_parameters() if p.requires_grad}
    leaf = {"lora_A": "lora_A.default.weight", "lora_B": "lora_B.default.weight",
            "magnitude": "lora_magnitude_vector.default.weight"}
    n_conv = 0
    for name, p in unet.named_parameters():
        if p.requires_grad:
            module, _, what = name.partition(".adapters.default.")
            want = theirs.pop(f"{module}.{leaf[what]}")
            assert want.abs().max() > 0, name
            torch.testing.assert_close(p.grad.flatten(), want.flatten(), **TOL, msg=lambda m, n=name: f"{n}: {m}")
            n_conv += isinstance(unet.get_submodule(module).adapters["default"], DoraConv)
    n_layers = sum(isinstance(layer.adapters["default"], DoraConv) for _, layer in adapted_layers(unet))
    assert not theirs and n_conv == 3 * n_layers > 60  # every PEFT gradient matched, conv ones (A, B, m) among them
    from peft.tuners.lora import LoraLayer

    slimtune.merge(unet)
    for module in twin.modules():
        if isinstance(module, LoraLayer):
            module.merge()  # PEFT's own DoRA merge, the oracle for slimtune's merged kernels
    for name, layer in adapted_layers(unet):
        torch.testing.assert_close(layer.base_layer.weight, twin.get_submodule(name).base_layer.weight,
                                   atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(unet_out(unet), unet_out(twin), **TOL)


def test_merge_unmerge_round_trip_on_the_unet():
    unet = dora_unet()
    w0 = {n: p.detach().clone() for n, p in unet.named_parameters() if "base_layer" in n}
    before = unet_out(unet)
    slimtune.merge(unet)
    torch.testing.assert_close(unet_out(unet), before, **TOL)
    slimtune.unmerge(unet)
    for n, p in unet.named_parameters():
        if n in w0:
            torch.testing.assert_close(p, w0[n], atol=1e-5, rtol=1e-5)  # W * ||V|| / m - s dW in fp32
    torch.testing.assert_close(unet_out(unet), before, **TOL)


def test_slimtune_file_loads_in_diffusers_and_its_pipeline(tmp_path):
    unet = dora_unet()
    slimtune.save_adapter(unet, tmp_path / "unet", format="diffusers")
    with safe_open(str(tmp_path / "unet" / DIFFUSERS_WEIGHTS_NAME), "pt") as f:
        shape = f.get_slice("unet.down_blocks.0.resnets.0.conv1.lora_magnitude_vector").get_shape()
    assert tuple(shape) == (1, 8, 1, 1)  # PEFT's layout, what diffusers hands to PEFT
    theirs = tiny_unet()
    theirs.load_lora_adapter(str(tmp_path / "unet"), prefix="unet", weight_name=DIFFUSERS_WEIGHTS_NAME)
    torch.testing.assert_close(unet_out(theirs), unet_out(unet), **TOL)

    pipe = tiny_pipeline(unet=unet)
    diffusion.save_lora_weights(tmp_path / "pipe", pipe)
    other = tiny_pipeline()
    other.load_lora_weights(str(tmp_path / "pipe"))
    torch.testing.assert_close(unet_out(other.unet), unet_out(unet), **TOL)


@pytest.mark.parametrize("writer", ["save_lora_weights", "save_lora_adapter"])
def test_diffusers_dora_conv_file_loads_in_slimtune(tmp_path, writer):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig as PeftLoraConfig
    from peft.utils import get_peft_model_state_dict

    theirs = tiny_unet()
    cfg = PeftLoraConfig(r=2, lora_alpha=6, target_modules=["to_k", "conv1", "conv_shortcut", "proj_in"],
                         use_dora=True, init_lora_weights=False)
    theirs.add_adapter(cfg)
    if writer == "save_lora_weights":
        StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(theirs),
                                                  unet_lora_adapter_metadata=cfg.to_dict())
    else:
        theirs.save_lora_adapter(str(tmp_path))
    ours = tiny_unet()
    report = slimtune.load_adapter(ours, tmp_path)
    assert ours.slimtune_configs["default"].use_dora
    peft_convs = {n for n, m in theirs.named_modules() if isinstance(getattr(m, "base_layer", None), torch.nn.Conv2d)}
    assert {n for n, layer in adapted_layers(ours) if isinstance(layer.adapters["default"], DoraConv)} == peft_convs
    assert len(peft_convs) > 8
    assert report.trainable_params == sum(p.numel() for n, p in theirs.named_parameters() if "lora_" in n)
    assert not torch.allclose(unet_out(theirs), unet_out(tiny_unet()), atol=1e-3)
    torch.testing.assert_close(unet_out(ours), unet_out(theirs), **TOL)


def test_peft_folder_of_a_dora_unet_round_trips(tmp_path):
    """The default format (PEFT's folder) reloads into slimtune exactly, conv magnitudes included."""
    unet = dora_unet(r=2, alpha=5)
    slimtune.save_adapter(unet, tmp_path)
    other = tiny_unet()
    slimtune.load_adapter(other, tmp_path)
    torch.testing.assert_close(unet_out(other), unet_out(unet), atol=0, rtol=0)
    conv = "down_blocks.0.resnets.0.conv1"
    a, b = (m.get_submodule(conv).adapters["default"] for m in (other, unet))
    assert torch.equal(a.magnitude, b.magnitude) and a.magnitude.shape == (8,)


def test_bf16_autocast_unet_tracks_fp32_as_closely_as_peft():
    """bf16 autocast forward + backward: outputs and the gradients of every A, B, m stay near fp32's, no
    farther than PEFT's own DoRA under the same autocast."""
    ref = dora_unet()
    twin = peft_twin(tiny_unet(), ref, dict(r=4, lora_alpha=8, target_modules=list(TARGETS), use_dora=True))
    out, want = unet_step(copy.deepcopy(ref), autocast=False)
    low, got = unet_step(ref, autocast=True)
    _, peft_got = unet_step(twin, autocast=True)
    assert low.dtype == torch.bfloat16 and got.dtype == torch.float32
    torch.testing.assert_close(low.float(), out, atol=0.05, rtol=0.05)
    ours_err, peft_err = (got - want).norm() / want.norm(), (peft_got - want).norm() / want.norm()
    assert want.norm() > 0 and ours_err < 0.05 and ours_err < 1.5 * peft_err, (ours_err, peft_err)


def unet_step(model, autocast: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(the UNet's output, every trainable gradient concatenated) for loss = mean(out^2)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(*unet_inputs()).sample
    out.float().square().mean().backward()
    return out, torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
