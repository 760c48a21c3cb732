"""Which tensors an adapter folder holds, under Hugging Face PEFT's key names (shared by reading and writing).

Keys are PEFT's exactly: ``base_model.model.<module path>.lora_A.weight`` with the adapter name stripped,
embedding LoRA as ``...lora_embedding_A`` (no ``.weight``), fully trained modules (``modules_to_save``) as
``base_model.model.<path>.<param>``. With ``bias="all"`` every bias is saved as PEFT saves it: a wrapped
layer's as ``<path>.base_layer.bias``, and for a module to save both the trained copy's
(``<path>.bias`` and ``<path>.modules_to_save.bias``) and the frozen original's
(``<path>.original_module.bias``), so the trained bias is never overwritten by the original's.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from slimtune import fingerprint
from slimtune.config import PromptTuningConfig
from slimtune.control import adapted_layers
from slimtune.layers.base import AdaptedLayer, TrainedCopy
from slimtune.methods.prompt import prompt_of

PREFIX = "base_model.model."
PROMPT_PREFIX = "base_model."  # PEFT's prompt learning wraps the model one level less deep


def config_of(model: nn.Module, adapter_name: str) -> Any:
    """The config adapter ``adapter_name`` was injected with; ValueError naming the adapters there are."""
    configs = getattr(model, "slimtune_configs", {})
    if adapter_name not in configs:
        raise ValueError(f"adapter_name={adapter_name!r}: no such adapter; the model has {list(configs) or 'none'}")
    return configs[adapter_name]


def adapter_tensors(model: nn.Module, adapter_name: str = "default") -> dict[str, Tensor]:
    """The adapter's tensors under PEFT's key names (adapter name stripped), detached. A tensor saved under
    two keys (``bias="all"`` with a module to save) is copied for the second, as safetensors refuses
    shared storage."""
    out, seen = {}, set()
    for k, v in live_tensors(model, adapter_name).items():
        out[k] = v.detach().clone() if id(v) in seen else v.detach().contiguous()
        seen.add(id(v))
    return out


def live_tensors(model: nn.Module, adapter_name: str) -> dict[str, Tensor]:
    """The parameters (and buffers) themselves, under PEFT's key names: what a load copies into.

    Two keys may name the same tensor (PEFT's duplicate ``modules_to_save.bias`` under ``bias="all"``).
    """
    cfg = config_of(model, adapter_name)
    out: dict[str, Tensor] = {}
    if isinstance(cfg, PromptTuningConfig):  # PEFT's keys: a bare prompt_embeddings, heads under base_model.
        out.update(prompt_of(model).file_tensors())
        out.update(trained_copies(model, adapter_name, PROMPT_PREFIX))
        return out
    for name, layer in adapted_layers(model):
        if adapter_name in layer.adapters:
            for key, t in layer.adapters[adapter_name].file_tensors().items():
                out[f"{PREFIX}{name}.{key}"] = t
            if cfg.bias == "lora_only" and getattr(layer.base_layer, "bias", None) is not None:
                out[f"{PREFIX}{name}.base_layer.bias"] = layer.base_layer.bias
    out.update(trained_copies(model, adapter_name, PREFIX))
    if cfg.bias == "all":
        out.update(all_biases(model, adapter_name))
    return out


def trained_copies(model: nn.Module, adapter_name: str, prefix: str) -> dict[str, Tensor]:
    """``modules_to_save`` tensors of ``adapter_name``: ``<prefix><module path>.<param>``."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, TrainedCopy) and adapter_name in module.copies:
            for key, t in module.copies[adapter_name].state_dict(keep_vars=True).items():
                out[f"{prefix}{name}.{key}"] = t
    return out


def all_biases(model: nn.Module, adapter_name: str) -> dict[str, Tensor]:
    """Every bias parameter for ``bias="all"``, under the names PEFT's state dict gives it.

    Inside a wrapper PEFT's module names differ from slimtune's: ``TrainedCopy.original`` is PEFT's
    ``original_module``, this adapter's copy is ``modules_to_save`` (adapter name stripped); other
    adapters' parameters are not this adapter's.
    """
    rename: dict[str, str | None] = {}  # slimtune name prefix -> PEFT name prefix (None: not saved)
    for name, module in model.named_modules():
        if isinstance(module, TrainedCopy):
            rename[f"{name}.original."] = f"{name}.original_module."
            for other in module.copies:
                rename[f"{name}.copies.{other}."] = f"{name}.modules_to_save." if other == adapter_name else None
        elif isinstance(module, AdaptedLayer):
            rename[f"{name}.adapters."] = None
    out = {}
    for name, p in model.named_parameters():
        if not name.endswith("bias"):
            continue
        key: str | None = name
        for old, new in rename.items():
            if name.startswith(old):
                key = None if new is None else new + name[len(old):]
                break
        if key is not None:
            out[f"{PREFIX}{key}"] = p
    return out


def fingerprint_layers(model: nn.Module, adapter_name: str) -> list[tuple[str, nn.Module]]:
    """(name, base layer) pairs the base-model fingerprint covers: the layers the adapter wraps, or for a
    prompt the input embedding. Raises RuntimeError while any adapter is merged (the weights would not be
    the base's)."""
    if any(layer.merged for _, layer in adapted_layers(model)):
        raise RuntimeError("adapters are merged into the base weights; unmerge before saving or loading "
                           "so the base-model fingerprint is computed on the original weights")
    if isinstance(config_of(model, adapter_name), PromptTuningConfig):
        emb = model.get_input_embeddings()
        return [(n, m) for n, m in model.named_modules() if m is emb]
    return [(n, layer.base_layer) for n, layer in adapted_layers(model) if adapter_name in layer.adapters]


def model_fingerprint(model: nn.Module, adapter_name: str) -> fingerprint.Fingerprint:
    """The base-model fingerprint of ``adapter_name``'s layers; the one kept in ``model.slimtune_fingerprints``
    when there is one (taken before FSDP2 sharded the frozen base over processes: see train/distributed.py)."""
    kept = getattr(model, "slimtune_fingerprints", {}).get(adapter_name)
    return kept if kept is not None else fingerprint.compute(model, fingerprint_layers(model, adapter_name))
