"""kohya-style LoRA files (lora_unet_.../lora_down/lora_up/alpha) load into slimtune with the update diffusers'
own kohya conversion gives (the oracle: StableDiffusionPipeline.load_lora_weights on the same dict)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import slimtune
from slimtune import diffusion
from slimtune.control import adapted_layers

from .conftest import te_out, tiny_pipeline, tiny_unet, unet_out

# module -> (rank, alpha): linear and conv (3x3 and 1x1) layers, alpha != r, two ranks. One alpha for all: diffusers'
# kohya conversion (the oracle) misnames per-module alphas of to_out.0 (an alpha_pattern key ending
# "processor.to_out_lora.down.weight"), so mixed alphas are checked against the maths only (MIXED_ALPHAS).
UNET_MODULES = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (4, 2.0),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (4, 2.0),
    "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0": (2, 2.0),
    "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj": (4, 2.0),
    "down_blocks.0.attentions.0.proj_in": (4, 2.0),
    "mid_block.resnets.0.conv1": (2, 2.0),
}
MIXED_ALPHAS = {**UNET_MODULES, "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0": (2, 8.0),
                "mid_block.resnets.0.conv1": (2, 1.0)}
# all four attention projections: diffusers' conversion recognises kohya text-encoder keys by the set
TE_MODULES = {f"encoder.layers.0.self_attn.{p}": (3, 6.0) for p in ("q_proj", "k_proj", "v_proj", "out_proj")}
TE_MODULES["encoder.layers.1.mlp.fc1"] = (3, 6.0)


def kohya_file(unet, te=None, alphas: bool = True, seed: int = 0, unet_modules=UNET_MODULES) -> tuple[dict, dict]:
    """A kohya state dict for the modules above, and the update each module should get: (alpha/r) B A."""
    g = torch.Generator().manual_seed(seed)
    sd, updates = {}, {}
    parts = [("lora_unet_", unet, unet_modules)] + ([("lora_te_text_model_", te, TE_MODULES)] if te else [])
    for prefix, model, modules in parts:
        for name, (r, alpha) in modules.items():
            w = model.get_submodule(name).weight  # (out, in) or (out, in, kh, kw)
            a = torch.randn(r, *w.shape[1:], generator=g) * 0.3
            b = torch.randn(w.shape[0], r, *([1, 1] if w.dim() == 4 else []), generator=g) * 0.3
            stem = prefix + name.replace(".", "_")
            sd[f"{stem}.lora_down.weight"], sd[f"{stem}.lora_up.weight"] = a, b
            if alphas:
                sd[f"{stem}.alpha"] = torch.tensor(alpha)
            scale = (alpha if alphas else r) / r
            updates[(model is unet, name)] = scale * (b.flatten(1) @ a.flatten(1)).view(w.shape)
    return sd, updates


@pytest.mark.parametrize("alphas", [True, False])
def test_kohya_file_loads_with_diffusers_update(tmp_path, alphas):
    ours = tiny_pipeline()
    sd, updates = kohya_file(ours.unet, ours.text_encoder, alphas)
    save_file(sd, tmp_path / "style.safetensors")
    reports = diffusion.load_lora_weights(ours, tmp_path / "style.safetensors")
    assert sorted(reports) == ["text_encoder", "unet"]
    for part in (ours.unet, ours.text_encoder):
        for name, layer in adapted_layers(part):
            delta = layer.adapters["default"].delta_weight(layer.base_layer)
            torch.testing.assert_close(delta, updates[(part is ours.unet, name)], atol=1e-6, rtol=1e-5)
    theirs = tiny_pipeline()
    theirs.load_lora_weights({k: v.clone() for k, v in sd.items()})  # diffusers' own kohya conversion
    for mine, peft_part in ((ours.unet, theirs.unet), (ours.text_encoder, theirs.text_encoder)):
        for name, layer in adapted_layers(mine):  # dW equal to PEFT's, layer by layer
            peft_layer = peft_part.get_submodule(name)
            (adapter,) = peft_layer.lora_A
            torch.testing.assert_close(layer.adapters["default"].delta_weight(layer.base_layer),
                                       peft_layer.get_delta_weight(adapter), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(unet_out(ours.unet), unet_out(theirs.unet), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(te_out(ours.text_encoder), te_out(theirs.text_encoder), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(unet_out(ours.unet), unet_out(tiny_unet()), atol=1e-3)


def test_kohya_unet_part_into_a_unet_mixed_alphas(tmp_path):
    unet = tiny_unet()
    sd, updates = kohya_file(unet, unet_modules=MIXED_ALPHAS)
    save_file(sd, tmp_path / "unet_only.safetensors")
    report = slimtune.load_adapter(unet, tmp_path / "unet_only.safetensors")
    assert sorted(w.name for w in report.wrapped) == sorted(MIXED_ALPHAS)
    assert {w.name: w.r for w in report.wrapped} == {n: r for n, (r, _) in MIXED_ALPHAS.items()}
    base = tiny_unet()
    for name in MIXED_ALPHAS:  # merged, the base weight moves by exactly the update
        base.get_submodule(name).weight.data += updates[(True, name)]
    torch.testing.assert_close(unet_out(unet), unet_out(base), atol=1e-5, rtol=1e-5)
