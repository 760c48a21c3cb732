"""diffusers' LoRA format: slimtune's files load in diffusers (UNet2DConditionModel.load_lora_adapter,
StableDiffusionPipeline.load_lora_weights) with outputs equal to slimtune's, and diffusers' files load in slimtune."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import slimtune
from slimtune import diffusion
from slimtune.files.diffusers_keys import DIFFUSERS_WEIGHTS_NAME, METADATA_KEY

from .conftest import randomize, te_out, tiny_pipeline, tiny_text_encoder, tiny_unet, unet_out

TOL = dict(atol=1e-5, rtol=1e-5)


def adapted_unet(**lora):
    unet = tiny_unet()
    kw = dict(r=4, alpha=8, target_modules=diffusion.UNET_ATTENTION) | lora
    slimtune.inject(unet, slimtune.LoraConfig(**kw))
    randomize(unet)
    return unet


def test_save_adapter_writes_diffusers_keys_and_alpha(tmp_path):
    unet = adapted_unet()
    assert slimtune.save_adapter(unet, tmp_path, format="diffusers") == tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == [DIFFUSERS_WEIGHTS_NAME]
    with safe_open(str(tmp_path / DIFFUSERS_WEIGHTS_NAME), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in keys
    assert all(k.startswith("unet.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    fields = json.loads(meta[METADATA_KEY])
    assert fields["unet.r"] == 4 and fields["unet.lora_alpha"] == 8


@pytest.mark.parametrize("lora", [
    dict(r=4, alpha=8),  # alpha != r: diffusers would assume scale 1 without the metadata
    dict(r=4, alpha=4, use_rslora=True, rank_pattern={"to_k": 2}, alpha_pattern={"to_v": 11}),
    dict(r=2, alpha=3, target_modules=diffusion.UNET_ATTENTION + diffusion.UNET_FEEDFORWARD + ("conv1", "proj_in"),
         layers_to_transform=(0,), layers_pattern="down_blocks"),
    dict(r=4, alpha=6, use_dora=True),
])
def test_unet_file_loads_in_diffusers_with_equal_outputs(tmp_path, lora):
    unet = adapted_unet(**lora)
    slimtune.save_adapter(unet, tmp_path, format="diffusers")
    theirs = tiny_unet()
    theirs.load_lora_adapter(str(tmp_path), prefix="unet", weight_name=DIFFUSERS_WEIGHTS_NAME)
    ours = unet_out(unet)
    assert not torch.allclose(ours, unet_out(tiny_unet()), atol=1e-3)
    torch.testing.assert_close(unet_out(theirs), ours, **TOL)


def test_pipeline_load_lora_weights_equals_slimtune(tmp_path):
    """Both parts in one file, written by slimtune, loaded by diffusers' pipeline: outputs equal."""
    pipe = tiny_pipeline()
    slimtune.inject(pipe.unet, slimtune.LoraConfig(r=4, alpha=8, target_modules=diffusion.UNET_ATTENTION + ("conv1",)))
    slimtune.inject(pipe.text_encoder, slimtune.LoraConfig(r=2, alpha=5, target_modules=diffusion.TEXT_ENCODER_ATTENTION))
    randomize(pipe.unet)
    randomize(pipe.text_encoder, seed=2)
    diffusion.save_lora_weights(tmp_path, pipe)
    theirs = tiny_pipeline()
    theirs.load_lora_weights(str(tmp_path))
    torch.testing.assert_close(unet_out(theirs.unet), unet_out(pipe.unet), **TOL)
    torch.testing.assert_close(te_out(theirs.text_encoder), te_out(pipe.text_encoder), **TOL)


def test_round_trip_into_slimtune_pipeline(tmp_path):
    pipe = tiny_pipeline()
    slimtune.inject(pipe.unet, slimtune.LoraConfig(r=4, alpha=8, target_modules=diffusion.UNET_ATTENTION))
    slimtune.inject(pipe.text_encoder, slimtune.LoraConfig(r=2, alpha=5, target_modules=diffusion.TEXT_ENCODER_MLP))
    randomize(pipe.unet)
    randomize(pipe.text_encoder, seed=2)
    diffusion.save_lora_weights(tmp_path, unet=pipe.unet, text_encoder=pipe.text_encoder)
    other = tiny_pipeline()
    reports = diffusion.load_lora_weights(other, tmp_path)
    assert sorted(reports) == ["text_encoder", "unet"]
    assert other.unet.slimtune_configs["default"] == pipe.unet.slimtune_configs["default"]  # exact, from our header
    torch.testing.assert_close(unet_out(other.unet), unet_out(pipe.unet), atol=0, rtol=0)
    torch.testing.assert_close(te_out(other.text_encoder), te_out(pipe.text_encoder), atol=0, rtol=0)


@pytest.mark.parametrize("with_metadata", [True, False])
def test_diffusers_own_file_loads_in_slimtune(tmp_path, with_metadata):
    """diffusers writes the file (save_lora_weights from PEFT layers); slimtune loads it with equal outputs.
    Without metadata both sides take alpha = r."""
    from peft import LoraConfig as PeftLoraConfig
    from peft.utils import get_peft_model_state_dict
    from diffusers import StableDiffusionPipeline

    theirs = tiny_unet()
    cfg = PeftLoraConfig(r=4, lora_alpha=8 if with_metadata else 4, target_modules=["to_q", "to_v", "proj_out"],
                         init_lora_weights=False)
    theirs.add_adapter(cfg)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(theirs),
        unet_lora_adapter_metadata=cfg.to_dict() if with_metadata else None)
    ours = tiny_unet()
    slimtune.load_adapter(ours, tmp_path)
    assert not torch.allclose(unet_out(theirs), unet_out(tiny_unet()), atol=1e-3)
    torch.testing.assert_close(unet_out(ours), unet_out(theirs), **TOL)


def test_model_level_file_from_save_lora_adapter(tmp_path):
    """``unet.save_lora_adapter`` writes keys without ``unet.``: slimtune.load_adapter takes them too."""
    from peft import LoraConfig as PeftLoraConfig

    theirs = tiny_unet()
    theirs.add_adapter(PeftLoraConfig(r=2, lora_alpha=6, target_modules=["to_k", "conv2"], init_lora_weights=False))
    theirs.save_lora_adapter(str(tmp_path))
    ours = tiny_unet()
    slimtune.load_adapter(ours, tmp_path)
    torch.testing.assert_close(unet_out(ours), unet_out(theirs), **TOL)


def test_text_encoder_part_by_class_or_component(tmp_path):
    te = tiny_text_encoder()
    slimtune.inject(te, slimtune.LoraConfig(r=2, alpha=3, target_modules=diffusion.TEXT_ENCODER_ATTENTION))
    randomize(te)
    slimtune.save_adapter(te, tmp_path, format="diffusers")  # a CLIPTextModel is the text_encoder
    with safe_open(str(tmp_path / DIFFUSERS_WEIGHTS_NAME), "pt") as f:
        assert all(k.startswith("text_encoder.text_model.") for k in f.keys())
    other = tiny_text_encoder()
    slimtune.load_adapter(other, tmp_path / DIFFUSERS_WEIGHTS_NAME, component="text_encoder")
    torch.testing.assert_close(te_out(other), te_out(te), atol=0, rtol=0)


def test_peft_folder_of_a_unet_still_loads_by_keys(tmp_path):
    """The default format stays PEFT's folder; load_adapter tells it from a diffusers file by its keys."""
    unet = adapted_unet(r=2, alpha=5)
    slimtune.save_adapter(unet, tmp_path / "peft")
    slimtune.save_adapter(unet, tmp_path / "diffusers", format="diffusers")
    assert sorted(p.name for p in (tmp_path / "peft").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    for folder in ("peft", "diffusers"):
        other = tiny_unet()
        slimtune.load_adapter(other, tmp_path / folder)
        torch.testing.assert_close(unet_out(other), unet_out(unet), atol=0, rtol=0)


def test_slimtune_diffusers_file_checks_the_base_model(tmp_path):
    """slimtune's header keeps the base-model fingerprint: another UNet is refused (the model untouched) unless
    check_base=False."""
    from slimtune.fingerprint import BaseModelMismatch

    slimtune.save_adapter(adapted_unet(), tmp_path, format="diffusers")
    other = tiny_unet(seed=5)
    with pytest.raises(BaseModelMismatch, match=DIFFUSERS_WEIGHTS_NAME):
        slimtune.load_adapter(other, tmp_path)
    assert not getattr(other, "slimtune_configs", {})
    slimtune.load_adapter(other, tmp_path, check_base=False)
    assert "default" in other.slimtune_configs
