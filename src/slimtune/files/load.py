"""Loading a validated adapter folder onto a model: all or nothing.

Order: (1) read and validate the folder (``read.read_folder``: config, tensors, metadata); (2) inject the
adapter's structure with a non-rewriting init and check every key and shape against it; (3) check the
base-model fingerprint; only then (4) copy the tensors (and, for PiSSA/OLoRA, write the residual base
weight). Any failure in (1)-(3) undoes the injection: state dict, ``requires_grad`` flags and the
model's adapter registry are exactly as before the call.

PiSSA / OLoRA files: like PEFT's ``save_pretrained`` without ``path_initial_model_for_weight_conversion``,
the saved A, B are relative to the *residual* base W_res = W0 - s B0 A0, where (A0, B0) is the SVD/QR split
of the original W0. So the model passed in must be the original, un-rewritten base: loading recomputes
the split from it, fingerprints the residual (what was fingerprinted at save time), and only after every
check writes W_res into the base weight, exactly as ``PeftModel.from_pretrained`` ends up.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from slimtune import fingerprint
from slimtune.config import LoraConfig, PromptTuningConfig
from slimtune.control import adapted_layers, delete_adapter
from slimtune.files.keys import PREFIX, fingerprint_layers, live_tensors
from slimtune.files.peft_schema import AdapterFileError
from slimtune.files.foreign import read_any
from slimtune.files.read import AdapterFolder
from slimtune.injection import inject, principal_factors, principal_residual
from slimtune.methods.prompt import inject_prompt
from slimtune.names import suffix_match
from slimtune.rollback import rollback_on_error


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default",
                 check_base: bool = True, component: str | None = None) -> Any:
    """Inject the adapter at ``path`` into ``model`` and load its weights: a PEFT folder (slimtune's or
    PEFT's), or a diffusers / kohya LoRA file (or a folder holding ``pytorch_lora_weights.safetensors``), told
    apart by their keys; ``component`` (``unet``, ``text_encoder``...) picks the part of a pipeline-wide file,
    by default the one ``model``'s class is (see ``slimtune.files.foreign``).

    Returns the injection report. Raises AdapterFileError (naming the file) for a missing, pickled,
    malformed or ill-fitting folder; fingerprint.BaseModelMismatch when the adapter was trained on
    another base (unless ``check_base=False``); ValueError when ``adapter_name`` is taken; RuntimeError
    while adapters are merged. On any error the model is exactly as before the call.
    """
    if adapter_name in getattr(model, "slimtune_configs", {}):
        raise ValueError(f"adapter_name={adapter_name!r}: the model already has an adapter of that name; "
                         "pass another adapter_name or slimtune.delete_adapter(model, name) first")
    if any(layer.merged for _, layer in adapted_layers(model)):
        raise RuntimeError("adapters are merged into the base weights; call slimtune.unmerge(model) before "
                           "loading, so the base-model fingerprint is computed on the original weights")
    folder = read_any(path, model, component)
    config = folder.config if folder.from_slimtune else _present_modules_to_save(model, folder.config)
    with rollback_on_error(model) as log:
        report = _inject_structure(model, config, adapter_name, folder)
        log.add(lambda: delete_adapter(model, adapter_name))
        targets = _check_fit(model, adapter_name, folder)
        residuals = _residuals(model, adapter_name, config)
        if check_base and folder.fingerprint is not None:
            _check_fingerprint(model, adapter_name, folder, residuals, path)
        _copy(targets, folder.tensors, model, adapter_name, residuals)  # the first write to any existing parameter
        model.slimtune_configs = {**model.slimtune_configs, adapter_name: config}
    return report


def _inject_structure(model: nn.Module, config: Any, adapter_name: str, folder: AdapterFolder) -> Any:
    """Inject ``config``'s adapter without changing any existing weight. A target or layer the model lacks
    is the file not fitting this model: AdapterFileError naming the config file."""
    try:
        if isinstance(config, PromptTuningConfig):  # the file holds the trained embeddings: no tokenizing
            return inject_prompt(model, dataclasses.replace(config, init="random"), adapter_name)
        if isinstance(config, LoraConfig) and config.rewrites_base:
            config = dataclasses.replace(config, init="kaiming")  # W0 is rewritten only after every check
        return inject(model, config, adapter_name)
    except (ValueError, TypeError) as e:
        raise AdapterFileError(f"{folder.config_path} does not fit this {type(model).__name__}: {e}") from None


def _check_fit(model: nn.Module, adapter_name: str, folder: AdapterFolder) -> dict[str, Tensor]:
    """The model tensors the file's tensors load into, keyed as in the file. Raises AdapterFileError for
    missing or unexpected keys or a shape the model does not have."""
    expected = live_tensors(model, adapter_name)
    expected.update(_base_weights_in_file(model, adapter_name, folder.tensors))
    missing = sorted(set(expected) - set(folder.tensors))
    unexpected = sorted(set(folder.tensors) - set(expected))
    if missing or unexpected:
        raise AdapterFileError(
            f"{folder.weights_path} does not fit this model: {len(missing)} missing keys (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected keys (e.g. {[folder.file_key(k) for k in unexpected[:2]]})")
    for key, target in expected.items():
        src = folder.tensors[key]
        if src.shape != target.shape:
            raise AdapterFileError(f"{folder.weights_path}: {folder.file_key(key)} has shape {tuple(src.shape)}, the model needs "
                                   f"{tuple(target.shape)} (different rank or base model?)")
    return expected


def _base_weights_in_file(model: nn.Module, adapter_name: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Full base weights of wrapped layers found in the file (PEFT writes the embedding matrix of a
    LoRA-wrapped embedding, e.g. after resizing the vocabulary): loaded into the base layer, as PEFT does."""
    out = {}
    for name, layer in adapted_layers(model):
        key = f"{PREFIX}{name}.base_layer.weight"
        if adapter_name in layer.adapters and key in tensors:
            out[key] = layer.base_layer.weight
    return out


def _residuals(model: nn.Module, adapter_name: str, config: Any) -> dict[str, Tensor]:
    """For a PiSSA/OLoRA adapter: module name -> W_res in the base weight's dtype and layout. Reads only."""
    if not (isinstance(config, LoraConfig) and config.rewrites_base):
        return {}
    out = {}
    for name, layer in adapted_layers(model):
        if adapter_name in layer.adapters:
            adapter, base = layer.adapters[adapter_name], layer.base_layer
            A, B = principal_factors(base, config.init, adapter.r, adapter.scale, name)
            out[name] = principal_residual(base, A, B, adapter.scale).to(base.weight.dtype)
    return out


def _check_fingerprint(model: nn.Module, adapter_name: str, folder: AdapterFolder,
                       residuals: dict[str, Tensor], path: Any) -> None:
    """fingerprint.check against the base the adapter will see (the residual for PiSSA/OLoRA). Raises
    BaseModelMismatch; warns when the weights match only statistically (another dtype, a 4-bit copy)."""
    layers = [(n, _with_weight(m, residuals[n]) if n in residuals else m)
              for n, m in fingerprint_layers(model, adapter_name)]
    current = fingerprint.compute(model, layers)
    try:
        note = fingerprint.check(folder.fingerprint, current)
    except fingerprint.BaseModelMismatch as e:
        raise fingerprint.BaseModelMismatch(f"{folder.weights_path}: {e}") from None
    except (KeyError, TypeError, AttributeError) as e:  # a metadata fingerprint of the wrong structure
        raise AdapterFileError(f"{folder.weights_path}: metadata 'slimtune_fingerprint' is malformed: {e!r}") from None
    if note:
        warnings.warn(f"{path}: {note}", stacklevel=3)


def _with_weight(base: nn.Module, weight: Tensor) -> nn.Module:
    """A shallow copy of ``base`` (same type and attributes) whose weight is ``weight``; ``base`` untouched."""
    stand_in = copy.copy(base)
    stand_in._parameters = dict(base._parameters, weight=nn.Parameter(weight, requires_grad=False))
    return stand_in


def _copy(targets: dict[str, Tensor], tensors: dict[str, Tensor], model: nn.Module, adapter_name: str,
          residuals: dict[str, Tensor]) -> None:
    """Copy every validated tensor (shapes checked) into the model; PiSSA/OLoRA: W0 becomes the residual."""
    bases = {n: layer.base_layer for n, layer in adapted_layers(model) if adapter_name in layer.adapters}
    with torch.no_grad():
        for key, target in targets.items():
            target.copy_(tensors[key])
        for name, residual in residuals.items():
            bases[name].weight.copy_(residual)


def _present_modules_to_save(model: nn.Module, config: Any) -> Any:
    """PEFT lists both ``classifier`` and ``score`` for any classifier (sometimes twice) and skips the absent
    one; so do we."""
    names = [n for n, _ in model.named_modules()]
    keep = tuple(t for t in dict.fromkeys(config.modules_to_save)
                 if any(suffix_match(n, (t,)) for n in names))
    return dataclasses.replace(config, modules_to_save=keep)
