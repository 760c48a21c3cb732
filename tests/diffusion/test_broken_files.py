"""Broken or foreign LoRA files: a named AdapterFileError (naming the file and the key), the model untouched."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import slimtune
from slimtune import diffusion
from slimtune.files import AdapterFileError
from slimtune.files.diffusers_keys import DIFFUSERS_WEIGHTS_NAME, METADATA_KEY

from .conftest import assert_same_state, randomize, state, tiny_pipeline, tiny_unet

Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
K = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
KOHYA_Q, KOHYA_K = "lora_unet_" + Q.replace(".", "_"), "lora_unet_" + K.replace(".", "_")


def kohya(**changes) -> dict:
    sd = {f"{KOHYA_Q}.lora_down.weight": torch.randn(2, 8), f"{KOHYA_Q}.lora_up.weight": torch.randn(8, 2),
          f"{KOHYA_Q}.alpha": torch.tensor(4.0),
          f"{KOHYA_K}.lora_down.weight": torch.randn(2, 8), f"{KOHYA_K}.lora_up.weight": torch.randn(8, 2),
          f"{KOHYA_K}.alpha": torch.tensor(4.0)}
    for k, v in changes.items():
        if v is None:
            sd.pop(k)
        else:
            sd[k] = v
    return sd


def diffusers_sd(**extra) -> dict:
    return {f"unet.{Q}.lora_A.weight": torch.randn(2, 8), f"unet.{Q}.lora_B.weight": torch.randn(8, 2), **extra}


CASES = {
    "partial alpha": (kohya(**{f"{KOHYA_K}.alpha": None}), None, f"{KOHYA_K}.alpha is missing"),
    "missing up": (kohya(**{f"{KOHYA_Q}.lora_up.weight": None}), None, f"{KOHYA_Q}.lora_up.weight is missing"),
    "wrong shape": (kohya(**{f"{KOHYA_Q}.lora_down.weight": torch.randn(2, 9)}), None,
                    f"{KOHYA_Q}.lora_down.weight has shape (2, 9)"),
    "alpha not scalar": (kohya(**{f"{KOHYA_Q}.alpha": torch.ones(2)}), None, f"{KOHYA_Q}.alpha must be one positive"),
    "unknown module": (kohya(**{"lora_unet_down_blocks_0_attn9_to_q.lora_down.weight": torch.randn(2, 8),
                               "lora_unet_down_blocks_0_attn9_to_q.lora_up.weight": torch.randn(8, 2),
                               "lora_unet_down_blocks_0_attn9_to_q.alpha": torch.tensor(1.0)}),
                       None, "names no adaptable module"),
    "unknown key": (diffusers_sd(**{"unet.conv_in.weight": torch.randn(3)}), None, "'unet.conv_in.weight' is no LoRA key"),
    "mixed formats": ({**diffusers_sd(), f"{KOHYA_K}.lora_down.weight": torch.randn(2, 8)}, None, "mix formats"),
    "lycoris": ({f"{KOHYA_Q}.hada_w1_a": torch.randn(2, 8)}, None, "LyCORIS LoHa"),
    "old diffusers": ({f"unet.{Q}.lora.down.weight": torch.randn(2, 8)}, None, "pre-PEFT"),
    "peft keys alone": ({f"base_model.model.{Q}.lora_A.weight": torch.randn(2, 8)}, None, "adapter_config.json"),
    "diffusers wrong shape": (diffusers_sd(**{f"unet.{Q}.lora_B.weight": torch.randn(7, 2)}), None,
                              f"unet.{Q}.lora_B.weight has shape (7, 2)"),
    "only text encoder": ({"text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(2, 12),
                           "text_encoder.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(12, 2)},
                          None, "holds LoRA for text_encoder, not for the unet"),
    "bad metadata": (diffusers_sd(), {METADATA_KEY: "{not json"}, "lora_adapter_metadata"),
    "metadata field unknown to slimtune": (diffusers_sd(), {METADATA_KEY: json.dumps({"unet.r": 2, "unet.lora_bias": True})},
                                           "lora_bias=True"),
    "nan": (diffusers_sd(**{f"unet.{Q}.lora_A.weight": torch.full((2, 8), float("nan"))}), None, "NaN"),
    "integer tensor": (kohya(**{f"{KOHYA_Q}.alpha": torch.tensor(4)}), None, "dtype torch.int64"),
    "missing B in diffusers": ({f"unet.{Q}.lora_A.weight": torch.randn(2, 8)}, None, "missing keys"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_broken_file_is_a_named_error_and_the_model_is_untouched(tmp_path, case):
    sd, meta, message = CASES[case]
    path = tmp_path / "broken.safetensors"
    save_file(sd, path, metadata=meta)
    unet = tiny_unet()
    slimtune.inject(unet, slimtune.LoraConfig(r=2, target_modules=("to_v",)), adapter_name="other")
    randomize(unet)
    before = state(unet)
    with pytest.raises(AdapterFileError) as e:
        slimtune.load_adapter(unet, path)
    assert message in str(e.value) and "broken.safetensors" in str(e.value)
    assert_same_state(unet, before)


def test_pipeline_load_is_all_or_nothing(tmp_path):
    """The UNet part loads, the text-encoder part does not fit: neither keeps an adapter."""
    sd = {**diffusers_sd(), "text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(2, 99),
          "text_encoder.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(12, 2)}
    save_file(sd, tmp_path / DIFFUSERS_WEIGHTS_NAME)
    pipe = tiny_pipeline()
    unet_before, te_before = state(pipe.unet), state(pipe.text_encoder)
    with pytest.raises(AdapterFileError, match=r"text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.weight has shape"):
        diffusion.load_lora_weights(pipe, tmp_path)
    assert_same_state(pipe.unet, unet_before)
    assert_same_state(pipe.text_encoder, te_before)


def test_save_refuses_what_diffusers_cannot_hold_and_writes_nothing(tmp_path):
    unet = tiny_unet()
    slimtune.inject(unet, slimtune.LoraConfig(r=2, target_modules=("to_q",), bias="all"))
    with pytest.raises(ValueError, match="bias='all'"):
        slimtune.save_adapter(unet, tmp_path / "out", format="diffusers")
    assert not (tmp_path / "out").exists()
    pissa = tiny_unet()
    slimtune.inject(pissa, slimtune.LoraConfig(r=2, target_modules=("to_q",), init="pissa"))
    with pytest.raises(ValueError, match="init='pissa'"):
        slimtune.save_adapter(pissa, tmp_path / "out", format="diffusers")
    with pytest.raises(ValueError, match="format='onnx': must be one of peft, diffusers"):
        slimtune.save_adapter(unet, tmp_path / "out", format="onnx")
    with pytest.raises(ValueError, match="component='vae': must be one of"):
        slimtune.save_adapter(unet, tmp_path / "out", format="diffusers", component="vae")
    with pytest.raises(ValueError, match="vae=: not a pipeline part"):
        diffusion.save_lora_weights(tmp_path / "out", vae=unet)
    assert not (tmp_path / "out").exists()


def test_save_while_merged_is_refused(tmp_path):
    unet = tiny_unet()
    slimtune.inject(unet, slimtune.LoraConfig(r=2, target_modules=("to_q",)))
    slimtune.merge(unet)
    with pytest.raises(RuntimeError, match="merged"):
        slimtune.save_adapter(unet, tmp_path, format="diffusers")
    assert not (tmp_path / DIFFUSERS_WEIGHTS_NAME).exists()


def test_kohya_file_for_a_model_of_unknown_class_needs_component(tmp_path):
    save_file(kohya(), tmp_path / "k.safetensors")
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with pytest.raises(AdapterFileError, match="pass component="):
        slimtune.load_adapter(model, tmp_path / "k.safetensors")
