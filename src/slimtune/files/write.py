"""Writing an adapter folder: ``adapter_config.json`` + ``adapter_model.safetensors``, atomically.

slimtune's own metadata (version, config, base-model fingerprint and a manifest of keys) goes in the
safetensors header, which PEFT ignores; reading checks it against adapter_config.json and the tensors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

from safetensors.torch import save_file
from torch import nn

from slimtune.atomic import atomic_file
from slimtune.config import LoraConfig
from slimtune.control import adapted_layers
from slimtune.files.diffusers_keys import (DIFFUSERS_WEIGHTS_NAME, METADATA_KEY, component_of, pack_metadata,
                                           to_diffusers_key)
from slimtune.files.keys import adapter_tensors, config_of, model_fingerprint
from slimtune.files.peft_schema import CONFIG_NAME, WEIGHTS_NAME, peft_config_dict
from slimtune.files.vllm_compat import warn_if_vllm_refuses
from slimtune.version import __version__


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write through a temp file in the same folder, then rename: never a half-written file."""
    atomic_file(path, write)


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default",
                 base_model_name_or_path: str | None = None, format: str = "peft",
                 component: str | None = None) -> Path:
    """Write adapter ``adapter_name`` to folder ``path``; returns the folder.

    ``format="peft"``: PEFT's layout (adapter_config.json + adapter_model.safetensors). ``format="diffusers"``:
    ``path/pytorch_lora_weights.safetensors`` as diffusers' pipelines load it, keys behind ``component``
    (default: by the model's class, ``unet`` for a UNet2DConditionModel; see ``save_diffusers``).
    Files are written to temporaries and renamed, so an interrupted save leaves the previous
    files (or nothing), never a truncated one. An adapter vLLM will refuse (DoRA, trained bias,
    modules_to_save, PiSSA/OLoRA init, not LoRA) is saved with a ``VllmIncompatibleWarning`` naming why. Raises ValueError for an unknown adapter name, format or
    component and RuntimeError while adapters are merged.
    """
    if format == "diffusers":
        return save_diffusers(path, {component_of(type(model).__name__, component): model}, adapter_name)
    if format != "peft":
        raise ValueError(f"format={format!r}: must be one of peft, diffusers")
    folder = Path(path)
    meta = {  # computed first: a merged model raises before anything is written
        "format": "pt",
        "slimtune_version": __version__,
        "slimtune_config": json.dumps(config_of(model, adapter_name).to_dict()),
        "slimtune_fingerprint": json.dumps(model_fingerprint(model, adapter_name).to_json()),
    }
    tensors = {k: v.cpu() for k, v in adapter_tensors(model, adapter_name).items()}
    meta["slimtune_manifest"] = json.dumps(sorted(tensors))
    config = peft_config_dict(model, adapter_name, base_model_name_or_path)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata=meta))
    atomic_write(folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))
    warn_if_vllm_refuses(config, folder)
    return folder


def save_diffusers(path: str | os.PathLike, components: Mapping[str, nn.Module], adapter_name: str = "default") -> Path:
    """Write ``path/pytorch_lora_weights.safetensors`` holding adapter ``adapter_name`` of each model in
    ``components`` (``{"unet": unet, "text_encoder": te}``) under its component's prefix, as diffusers'
    ``save_lora_weights`` does; returns the folder.

    The header carries diffusers' ``lora_adapter_metadata`` (so ``load_lora_weights`` keeps alpha != r) and
    slimtune's config and base-model fingerprint per component. Raises ValueError for an adapter diffusers
    cannot hold (not LoRA/DoRA, ``bias`` trained, ``modules_to_save``, PiSSA/OLoRA init) and RuntimeError
    while merged; nothing is written then.
    """
    tensors, fields, own = {}, {}, {}
    for comp, model in components.items():
        cfg = config_of(model, adapter_name)
        if not isinstance(cfg, LoraConfig) or cfg.bias != "none" or cfg.modules_to_save:
            raise ValueError(f"format='diffusers' holds LoRA/DoRA updates only; the {comp}'s adapter "
                             f"{adapter_name!r} is {cfg.method} with bias={getattr(cfg, 'bias', None)!r}, "
                             f"modules_to_save={list(getattr(cfg, 'modules_to_save', ()))}: save it with format='peft'")
        if cfg.rewrites_base:  # its A, B are relative to a rewritten base diffusers does not have
            raise ValueError(f"format='diffusers': the {comp}'s adapter {adapter_name!r} has init={cfg.init!r}, whose "
                             "update is relative to a rewritten base weight; save it with format='peft'")
        own[comp] = {"config": cfg.to_dict(), "fingerprint": model_fingerprint(model, adapter_name).to_json()}
        flat_clip = comp.startswith("text_encoder") and not hasattr(model, "text_model")
        tensors.update({to_diffusers_key(k, comp, flat_clip): v.cpu()
                        for k, v in adapter_tensors(model, adapter_name).items()})
        fields[comp] = diffusers_fields(model, adapter_name)
    meta = {"format": "pt", METADATA_KEY: pack_metadata(fields), "slimtune_version": __version__,
            "slimtune_components": json.dumps(own), "slimtune_manifest": json.dumps(sorted(tensors))}
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / DIFFUSERS_WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return folder


def diffusers_fields(model: nn.Module, adapter_name: str) -> dict[str, Any]:
    """PEFT LoraConfig fields for diffusers' metadata: the wrapped modules by full name, and each module's
    rank and alpha where it differs from the config's (so no pattern needs re-matching on the other side)."""
    fields = peft_config_dict(model, adapter_name, None)
    layers = {n: l.adapters[adapter_name] for n, l in adapted_layers(model) if adapter_name in l.adapters}
    fields.update(target_modules=sorted(layers), layers_to_transform=None, layers_pattern=None,
                  exclude_modules=None, task_type=None,
                  rank_pattern={n: a.r for n, a in layers.items() if a.r != fields["r"]},
                  alpha_pattern={n: a.alpha for n, a in layers.items() if a.alpha != fields["lora_alpha"]})
    return fields
