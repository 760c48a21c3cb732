"""The parts of a diffusion pipeline LoRA adapts: target names, and saving / loading every part at once.

Target names follow diffusers' own LoRA training scripts (``train_text_to_image_lora.py``,
``train_dreambooth_lora.py``): attention projections by default, optionally the feed-forward, the
transformer's ``proj_in``/``proj_out`` and the resnets' convolutions.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from slimtune.control import delete_adapter
from slimtune.files.diffusers_keys import COMPONENTS
from slimtune.files.foreign import components_in
from slimtune.files.load import load_adapter
from slimtune.files.peft_schema import AdapterFileError
from slimtune.files.write import save_diffusers

UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")  # self- and cross-attention of every transformer block
UNET_FEEDFORWARD = ("ff.net.0.proj", "ff.net.2")  # GEGLU in, linear out
UNET_CONV = ("proj_in", "proj_out", "conv1", "conv2", "conv_shortcut")  # Conv2d (1x1 proj_* on SD 1.x)
TEXT_ENCODER_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")  # CLIP, as in diffusers' scripts
TEXT_ENCODER_MLP = ("fc1", "fc2")


def adapted_parts(source: Any, adapter_name: str = "default") -> dict[str, nn.Module]:
    """component -> model for each part of a pipeline (any object with ``unet``/``text_encoder``... attributes)
    that holds slimtune adapter ``adapter_name``."""
    parts = {}
    for comp in COMPONENTS:
        model = getattr(source, comp, None)
        if isinstance(model, nn.Module) and adapter_name in getattr(model, "slimtune_configs", {}):
            parts[comp] = model
    return parts


def save_lora_weights(path: str | os.PathLike, pipeline: Any = None, adapter_name: str = "default",
                      **parts: nn.Module) -> Path:
    """Write ``path/pytorch_lora_weights.safetensors`` (diffusers' format) with adapter ``adapter_name`` of
    every part given, ``save_lora_weights(path, unet=unet, text_encoder=te)``, or of every part of
    ``pipeline`` that has it. Raises ValueError for an unknown part name or when no part has the adapter."""
    unknown = sorted(set(parts) - set(COMPONENTS))
    if unknown:
        raise ValueError(f"{unknown[0]}=: not a pipeline part diffusers' LoRA files hold; use {', '.join(COMPONENTS)}")
    chosen = dict(adapted_parts(pipeline, adapter_name)) if pipeline is not None else {}
    chosen.update({k: v for k, v in parts.items() if v is not None})
    if not chosen:
        raise ValueError(f"adapter_name={adapter_name!r}: no part given holds this adapter "
                         f"(pass unet=, text_encoder= or a pipeline whose parts slimtune.inject adapted)")
    return save_diffusers(path, chosen, adapter_name)


def load_lora_weights(pipeline: Any, path: str | os.PathLike, adapter_name: str = "default",
                      check_base: bool = True) -> dict[str, Any]:
    """Load a diffusers or kohya LoRA file into every part of ``pipeline`` it holds weights for (as
    diffusers' ``pipeline.load_lora_weights`` does, but into slimtune adapters). Returns component ->
    injection report. All or nothing: on an error in any part, the parts loaded before it are unloaded
    again. Raises AdapterFileError (see ``slimtune.load_adapter``)."""
    reports: dict[str, Any] = {}
    try:
        for comp in components_in(path):
            model = getattr(pipeline, comp, None)
            if not isinstance(model, nn.Module):
                raise AdapterFileError(f"{path} holds LoRA for the {comp}, which this pipeline lacks")
            reports[comp] = load_adapter(model, path, adapter_name, check_base, component=comp)
    except BaseException:
        for comp in reports:
            delete_adapter(getattr(pipeline, comp), adapter_name)
        raise
    return reports
