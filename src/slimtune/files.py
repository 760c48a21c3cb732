"""Adapter folders in Hugging Face PEFT's layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are PEFT's exactly: ``base_model.model.<module path>.lora_A.weight`` with the adapter name
stripped, embedding LoRA as ``...lora_embedding_A`` (no ``.weight``), fully trained modules as
``base_model.model.<path>.<param>``. slimtune's own metadata (version, base-model fingerprint and a
manifest of keys) goes in the safetensors header, which PEFT ignores. Only JSON and safetensors
are ever read: a pickled ``adapter_model.bin`` is refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from slimtune import fingerprint
from slimtune.config import ALL_LINEAR, BottleneckConfig, LoraConfig, PromptTuningConfig, config_from_dict
from slimtune.control import adapted_layers, delete_adapter
from slimtune.injection import inject
from slimtune.layers.base import TrainedCopy
from slimtune.methods.prompt import inject_prompt, prompt_of
from slimtune.names import suffix_match
from slimtune.version import __version__

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
PROMPT_PREFIX = "base_model."  # PEFT's prompt learning wraps the model one level less deep


class AdapterFileError(ValueError):
    """An adapter folder is missing, unsafe, or does not fit the model."""


# -- what gets saved -----------------------------------------------------------------------

def adapter_tensors(model: nn.Module, adapter_name: str = "default") -> dict[str, Tensor]:
    """The adapter's tensors under PEFT's key names (adapter name stripped), detached."""
    return {k: v.detach().contiguous() for k, v in _live_tensors(model, adapter_name).items()}


def _live_tensors(model: nn.Module, adapter_name: str) -> dict[str, Tensor]:
    """The parameters (and buffers) themselves, under PEFT's key names."""
    cfg = _config_of(model, adapter_name)
    out: dict[str, Tensor] = {}
    if isinstance(cfg, PromptTuningConfig):  # PEFT's keys: a bare prompt_embeddings, heads under base_model.
        out.update(prompt_of(model).file_tensors())
        out.update(_trained_copies(model, adapter_name, PROMPT_PREFIX))
        return out
    for name, layer in adapted_layers(model):
        if adapter_name in layer.adapters:
            for key, t in layer.adapters[adapter_name].file_tensors().items():
                out[f"{PREFIX}{name}.{key}"] = t
            if cfg.bias == "lora_only" and getattr(layer.base_layer, "bias", None) is not None:
                out[f"{PREFIX}{name}.base_layer.bias"] = layer.base_layer.bias
    out.update(_trained_copies(model, adapter_name, PREFIX))
    if cfg.bias == "all":
        for name, p in _plain_named_parameters(model):
            if name.endswith("bias"):
                out[f"{PREFIX}{name}"] = p
    return out


def _plain_named_parameters(model: nn.Module):
    """Base parameters under PEFT's names: a LoRA-wrapped layer keeps ``.base_layer.`` as PEFT's does."""
    for name, p in model.named_parameters():
        if ".adapters." in name or ".copies." in name:
            continue
        yield name.replace(".original.", "."), p


def _config_of(model: nn.Module, adapter_name: str) -> LoraConfig:
    configs = getattr(model, "slimtune_configs", {})
    if adapter_name not in configs:
        raise ValueError(f"adapter_name={adapter_name!r}: no such adapter; the model has {list(configs) or 'none'}")
    return configs[adapter_name]


def peft_config_dict(model: nn.Module, adapter_name: str, base_model_name_or_path: str | None) -> dict[str, Any]:
    """adapter_config.json in PEFT's schema for a slimtune LoRA/DoRA adapter.

    Methods PEFT lacks (bottleneck adapters) get slimtune's own schema, ``peft_type: SLIMTUNE_BOTTLENECK``.
    """
    cfg = _config_of(model, adapter_name)
    if isinstance(cfg, PromptTuningConfig):
        mc = getattr(model, "config", None)
        return {"peft_type": "PROMPT_TUNING", "task_type": _task_type(model, cfg),
                "num_virtual_tokens": cfg.num_virtual_tokens, "token_dim": prompt_of(model).embedding.shape[1],
                "num_transformer_submodules": 1, "num_attention_heads": getattr(mc, "num_attention_heads", None),
                "num_layers": getattr(mc, "num_hidden_layers", None), "prompt_tuning_init": "RANDOM",
                "prompt_tuning_init_text": None, "tokenizer_name_or_path": None, "inference_mode": True,
                "modules_to_save": list(cfg.modules_to_save) or None,
                "base_model_name_or_path": base_model_name_or_path, "revision": None}
    if isinstance(cfg, BottleneckConfig):
        return {"peft_type": "SLIMTUNE_BOTTLENECK", "slimtune_config": cfg.to_dict(),
                "base_model_name_or_path": base_model_name_or_path}
    targets: Any = cfg.target_modules
    if targets == ALL_LINEAR or cfg.target_types:
        # PEFT expands "all-linear" to leaf names when it saves; do the same, and cover target_types.
        targets = sorted({n.rsplit(".", 1)[-1] for n, l in adapted_layers(model) if adapter_name in l.adapters})
    return {
        "peft_type": "LORA", "task_type": _task_type(model, cfg), "r": cfg.r, "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout, "target_modules": list(targets) if not isinstance(targets, str) else targets,
        "exclude_modules": list(cfg.exclude_modules) or None, "bias": cfg.bias,
        "fan_in_fan_out": any(getattr(l.adapters[adapter_name], "fan_in_fan_out", False)
                              for _, l in adapted_layers(model) if adapter_name in l.adapters),
        "init_lora_weights": True if cfg.init == "kaiming" else cfg.init, "use_rslora": cfg.use_rslora,
        "use_dora": cfg.use_dora,
        "modules_to_save": list(cfg.modules_to_save) or None,
        "layers_to_transform": list(cfg.layers_to_transform) or None, "layers_pattern": cfg.layers_pattern,
        "rank_pattern": dict(cfg.rank_pattern), "alpha_pattern": dict(cfg.alpha_pattern),
        "inference_mode": True, "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
    }


def _task_type(model: nn.Module, cfg: LoraConfig) -> str | None:
    """PEFT's task type. A classification task makes PEFT expect a trained head in the file, so a
    classifier whose head is not in ``modules_to_save`` is written with no task type."""
    archs = getattr(getattr(model, "config", None), "architectures", None) or [type(model).__name__]
    name = archs[0]
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"),
                         ("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS")):
        if name.endswith(suffix):
            return task if task == "CAUSAL_LM" or getattr(cfg, "modules_to_save", ()) else None
    return None


def _fingerprint(model: nn.Module, adapter_name: str) -> fingerprint.Fingerprint:
    layers = [(n, l.base_layer) for n, l in adapted_layers(model) if adapter_name in l.adapters]
    if isinstance(_config_of(model, adapter_name), PromptTuningConfig):
        emb = model.get_input_embeddings()
        layers = [(n, m) for n, m in model.named_modules() if m is emb]
    if any(l.merged for _, l in adapted_layers(model)):
        raise RuntimeError("adapters are merged into the base weights; unmerge before saving or loading "
                           "so the base-model fingerprint is computed on the original weights")
    return fingerprint.compute(model, layers)


# -- writing ---------------------------------------------------------------------------------

def _atomic_write(path: Path, write) -> None:
    """Write through a temp file in the same folder, then rename: never a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default",
                 base_model_name_or_path: str | None = None) -> Path:
    """Write adapter ``adapter_name`` to folder ``path`` in PEFT's layout; returns the folder.

    Files are written to temporaries and renamed, so an interrupted save leaves the previous
    files (or nothing), never a truncated one.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.cpu() for k, v in adapter_tensors(model, adapter_name).items()}
    meta = {
        "format": "pt",
        "slimtune_version": __version__,
        "slimtune_config": json.dumps(_config_of(model, adapter_name).to_dict()),
        "slimtune_fingerprint": json.dumps(_fingerprint(model, adapter_name).to_json()),
        "slimtune_manifest": json.dumps(sorted(tensors)),
    }
    config = peft_config_dict(model, adapter_name, base_model_name_or_path)
    _atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata=meta))
    _atomic_write(folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))
    return folder


# -- reading ---------------------------------------------------------------------------------

def _read_folder(folder: Path) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, str]]:
    if not folder.is_dir():
        raise AdapterFileError(f"adapter path {str(folder)!r} is not a folder")
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        if pickled:
            raise AdapterFileError(
                f"{folder} holds {pickled[0]}, a pickle file; slimtune never unpickles files (loading a pickle "
                "can run arbitrary code). Convert it where you trust it: "
                "safetensors.torch.save_file(torch.load(f, weights_only=True), 'adapter_model.safetensors')")
        raise AdapterFileError(f"{folder} has no {WEIGHTS_NAME}")
    if not (folder / CONFIG_NAME).is_file():
        raise AdapterFileError(f"{folder} has no {CONFIG_NAME}")
    config = json.loads((folder / CONFIG_NAME).read_text())
    with safe_open(str(weights), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return config, tensors, meta


_UNSUPPORTED = {"lora_bias": "LoRA bias vectors", "use_qalora": "QA-LoRA"}
_PEFT_INITS = {True: "kaiming", False: "kaiming", "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}


def lora_config_from_peft(d: dict[str, Any]) -> LoraConfig:
    """Translate a PEFT LoRA adapter_config.json into a LoraConfig, refusing what slimtune lacks."""
    if d.get("peft_type") != "LORA":
        raise AdapterFileError(f"peft_type={d.get('peft_type')!r}: slimtune loads LORA adapters")
    for key, what in _UNSUPPORTED.items():
        if d.get(key):
            raise AdapterFileError(f"{key}={d[key]!r}: {what} adapters are not supported by this slimtune version")
    targets = d.get("target_modules")
    init = d.get("init_lora_weights", True)
    if init not in _PEFT_INITS:
        raise AdapterFileError(f"init_lora_weights={init!r}: slimtune loads {', '.join(map(repr, _PEFT_INITS))}; "
                               "this init rewrites the base weight in a way slimtune does not reproduce")
    return LoraConfig(
        r=d["r"], alpha=d.get("lora_alpha", 8), dropout=d.get("lora_dropout") or 0.0,
        target_modules=targets if isinstance(targets, str) else tuple(targets or ()),
        exclude_modules=_tuple(d.get("exclude_modules")),
        layers_to_transform=_tuple(d.get("layers_to_transform")),
        layers_pattern=_first(d.get("layers_pattern")),
        rank_pattern=d.get("rank_pattern") or {}, alpha_pattern=d.get("alpha_pattern") or {},
        modules_to_save=_tuple(d.get("modules_to_save")),
        init=_PEFT_INITS[init], use_rslora=bool(d.get("use_rslora", False)),
        use_dora=bool(d.get("use_dora", False)), bias=d.get("bias", "none"))


def _tuple(v: Any) -> tuple:
    if v is None:
        return ()
    return (v,) if isinstance(v, (str, int)) else tuple(v)


def _trained_copies(model: nn.Module, adapter_name: str, prefix: str) -> dict[str, Tensor]:
    """``modules_to_save`` tensors of ``adapter_name``: ``<prefix><module path>.<param>``."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, TrainedCopy) and adapter_name in module.copies:
            for key, t in module.copies[adapter_name].state_dict(keep_vars=True).items():
                out[f"{prefix}{name}.{key}"] = t
    return out


def _first(v: Any) -> str | None:
    return v[0] if isinstance(v, list) and v else (v or None)


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default",
                 check_base: bool = True) -> Any:
    """Inject the adapter in folder ``path`` (slimtune's or PEFT's) into ``model`` and load its weights.

    Returns the injection report. Raises AdapterFileError for a missing/pickled/mismatched file and
    fingerprint.BaseModelMismatch when the adapter was trained on another base (unless
    ``check_base=False``). On error the model is left without the new adapter.
    """
    config_dict, tensors, meta = _read_folder(Path(path))
    if "slimtune_config" in meta:
        config = config_from_dict(json.loads(meta["slimtune_config"]))
    elif config_dict.get("peft_type") == "PROMPT_TUNING":
        config = _present_modules_to_save(model, PromptTuningConfig(
            num_virtual_tokens=config_dict["num_virtual_tokens"],
            modules_to_save=_tuple(config_dict.get("modules_to_save"))))
    elif config_dict.get("peft_type") == "SLIMTUNE_BOTTLENECK":
        config = config_from_dict(config_dict["slimtune_config"])
    else:
        config = _present_modules_to_save(model, lora_config_from_peft(config_dict))
    if isinstance(config, PromptTuningConfig):
        # the file holds the trained embeddings: no need to tokenize init_text again
        report = inject_prompt(model, dataclasses.replace(config, init="random"), adapter_name)
    else:
        report = inject(model, config, adapter_name)
    try:
        _load_tensors(model, adapter_name, tensors)
        if check_base and "slimtune_fingerprint" in meta:
            saved = fingerprint.Fingerprint.from_json(json.loads(meta["slimtune_fingerprint"]))
            note = fingerprint.check(saved, _fingerprint(model, adapter_name))
            if note:
                warnings.warn(f"{path}: {note}", stacklevel=2)
    except Exception:
        delete_adapter(model, adapter_name)
        raise
    return report


def _load_tensors(model: nn.Module, adapter_name: str, tensors: dict[str, Tensor]) -> None:
    expected = _live_tensors(model, adapter_name)
    expected.update(_base_weights_in_file(model, adapter_name, tensors))
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise AdapterFileError(
            f"adapter file does not fit this model: {len(missing)} missing keys (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:2]})")
    with torch.no_grad():
        for key, target in expected.items():
            src = tensors[key]
            if src.shape != target.shape:
                raise AdapterFileError(f"{key}: file has shape {tuple(src.shape)}, the model needs "
                                       f"{tuple(target.shape)} (different rank or base model?)")
            target.copy_(src)



def _base_weights_in_file(model: nn.Module, adapter_name: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Full base weights of wrapped layers found in the file (PEFT writes the embedding matrix of a
    LoRA-wrapped embedding, e.g. after resizing the vocabulary): loaded into the base layer, as PEFT does."""
    out = {}
    for name, layer in adapted_layers(model):
        key = f"{PREFIX}{name}.base_layer.weight"
        if adapter_name in layer.adapters and key in tensors:
            out[key] = layer.base_layer.weight
    return out


def _present_modules_to_save(model: nn.Module, config: Any) -> Any:
    """PEFT lists both ``classifier`` and ``score`` for any classifier (sometimes twice) and skips the absent
    one; so do we."""
    names = [n for n, _ in model.named_modules()]
    keep = tuple(t for t in dict.fromkeys(config.modules_to_save)
                 if any(suffix_match(n, (t,)) for n in names))
    return dataclasses.replace(config, modules_to_save=keep)
