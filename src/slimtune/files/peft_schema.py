"""adapter_config.json: slimtune configs to and from Hugging Face PEFT's schema.

Writing: ``peft_config_dict`` gives PEFT's JSON for a LoRA/DoRA or prompt-tuning adapter, and slimtune's
own ``SLIMTUNE_BOTTLENECK`` schema for bottleneck adapters (PEFT has none). Reading: ``config_from_file``
turns a parsed adapter_config.json back into a slimtune config, refusing what slimtune cannot load with
an ``AdapterFileError`` naming the file, the field, the value and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from slimtune.config import ALL_LINEAR, BottleneckConfig, ConfigError, LoraConfig, PromptTuningConfig, config_from_dict
from slimtune.control import adapted_layers
from slimtune.files.keys import config_of
from slimtune.methods.prompt import prompt_of

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LOADABLE_PEFT_TYPES = ("LORA", "PROMPT_TUNING", "SLIMTUNE_BOTTLENECK")
_UNSUPPORTED = {"lora_bias": "LoRA bias vectors", "use_qalora": "QA-LoRA"}
_PEFT_INITS = {True: "kaiming", False: "kaiming", "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}


class AdapterFileError(ValueError):
    """An adapter folder is missing, unsafe, malformed, or does not fit the model."""


# -- writing -----------------------------------------------------------------------------------

def peft_config_dict(model: nn.Module, adapter_name: str, base_model_name_or_path: str | None) -> dict[str, Any]:
    """adapter_config.json in PEFT's schema for a slimtune LoRA/DoRA adapter.

    Methods PEFT lacks (bottleneck adapters) get slimtune's own schema, ``peft_type: SLIMTUNE_BOTTLENECK``.
    """
    cfg = config_of(model, adapter_name)
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


def _task_type(model: nn.Module, cfg: Any) -> str | None:
    """PEFT's task type. A classification task makes PEFT expect a trained head in the file, so a
    classifier whose head is not in ``modules_to_save`` is written with no task type."""
    archs = getattr(getattr(model, "config", None), "architectures", None) or [type(model).__name__]
    name = archs[0]
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"),
                         ("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS")):
        if name.endswith(suffix):
            return task if task == "CAUSAL_LM" or getattr(cfg, "modules_to_save", ()) else None
    return None


# -- reading -----------------------------------------------------------------------------------

def config_from_file(d: Any, path: Path) -> Any:
    """The slimtune config a parsed adapter_config.json (at ``path``) describes.

    Raises AdapterFileError (naming ``path``) when it is not an object, lacks ``peft_type`` or a field the
    type requires, names a type slimtune cannot load, or holds a value the config refuses.
    """
    if not isinstance(d, dict):
        raise AdapterFileError(f"{path}: must hold a JSON object, not {type(d).__name__}")
    peft_type = d.get("peft_type")
    if peft_type is None:
        raise AdapterFileError(f"{path}: required field 'peft_type' is missing")
    if peft_type not in LOADABLE_PEFT_TYPES:
        raise AdapterFileError(f"{path}: peft_type={peft_type!r}: slimtune loads adapters of type "
                               f"{', '.join(LOADABLE_PEFT_TYPES)} only ({path.parent} holds another kind)")
    try:
        if peft_type == "PROMPT_TUNING":
            n = _required(d, "num_virtual_tokens", path)
            return PromptTuningConfig(num_virtual_tokens=n, modules_to_save=_str_tuple(d, "modules_to_save", path))
        if peft_type == "SLIMTUNE_BOTTLENECK":
            inner = _required(d, "slimtune_config", path)
            if not isinstance(inner, dict) or inner.get("method", "bottleneck") != "bottleneck":
                raise AdapterFileError(f"{path}: slimtune_config={inner!r}: must be an object with method 'bottleneck'")
            return config_from_dict(inner)
        return lora_config_from_peft(d, path)
    except (ConfigError, TypeError, ValueError) as e:
        if isinstance(e, AdapterFileError):
            raise
        raise AdapterFileError(f"{path}: {e}") from None


def lora_config_from_peft(d: dict[str, Any], path: Path | str = CONFIG_NAME) -> LoraConfig:
    """Translate a PEFT LoRA adapter_config.json into a LoraConfig, refusing what slimtune lacks.

    Raises AdapterFileError for a missing ``r``, a feature slimtune lacks, or an init it cannot reproduce;
    ConfigError (a ValueError) for a value LoraConfig refuses.
    """
    if d.get("peft_type") != "LORA":
        raise AdapterFileError(f"{path}: peft_type={d.get('peft_type')!r}: slimtune loads LORA adapters here")
    for key, what in _UNSUPPORTED.items():
        if d.get(key):
            raise AdapterFileError(f"{path}: {key}={d[key]!r}: {what} adapters are not supported by this "
                                   "slimtune version")
    r = _required(d, "r", path)
    targets = d.get("target_modules")
    if targets is not None and not isinstance(targets, str):
        targets = _str_tuple(d, "target_modules", path)
    init = d.get("init_lora_weights", True)
    if not isinstance(init, (bool, str)) or init not in _PEFT_INITS:
        raise AdapterFileError(f"{path}: init_lora_weights={init!r}: slimtune loads "
                               f"{', '.join(map(repr, _PEFT_INITS))}; this init rewrites the base weight in a way "
                               "slimtune does not reproduce")
    return LoraConfig(
        r=r, alpha=d.get("lora_alpha", 8), dropout=d.get("lora_dropout") or 0.0,
        target_modules=targets or (), exclude_modules=_str_tuple(d, "exclude_modules", path),
        layers_to_transform=_tuple(d.get("layers_to_transform")),
        layers_pattern=_first(d.get("layers_pattern")),
        rank_pattern=_dict(d, "rank_pattern", path), alpha_pattern=_dict(d, "alpha_pattern", path),
        modules_to_save=_str_tuple(d, "modules_to_save", path),
        init=_PEFT_INITS[init], use_rslora=_bool(d, "use_rslora", path), use_dora=_bool(d, "use_dora", path),
        bias=d.get("bias", "none"))


def check_agreement(saved: Any, from_file: Any, path: Path) -> None:
    """Raise AdapterFileError unless slimtune's own metadata config ``saved`` and the config adapter_config.json
    (``path``) describes, ``from_file``, are the same method with the same weight-defining fields."""
    if type(saved) is not type(from_file) or getattr(saved, "use_dora", False) != getattr(from_file, "use_dora", False):
        raise AdapterFileError(
            f"{path} describes a {_method(from_file)} adapter but the weights file's slimtune metadata says "
            f"{_method(saved)}: the folder mixes files of two adapters; refusing to guess which is right")
    for field in _agreeing_fields(saved):
        a, b = getattr(saved, field), getattr(from_file, field)
        if field in ("modules_to_save", "target_modules") and not isinstance(a, str):
            a, b = set(a), set(b) if not isinstance(b, str) else b
        if a != b:
            raise AdapterFileError(f"{path}: {field}={getattr(from_file, field)!r} but the weights file's slimtune "
                                   f"metadata says {getattr(saved, field)!r}: the two files disagree")


def _agreeing_fields(cfg: Any) -> tuple[str, ...]:
    if isinstance(cfg, PromptTuningConfig):
        return ("num_virtual_tokens", "modules_to_save")
    if isinstance(cfg, BottleneckConfig):
        return tuple(cfg.to_dict())
    fields = ("r", "alpha", "dropout", "use_rslora", "bias", "init", "rank_pattern", "alpha_pattern",
              "layers_to_transform", "layers_pattern", "modules_to_save", "exclude_modules")
    if cfg.target_modules != ALL_LINEAR and not cfg.target_types:  # else saved expanded to leaf names
        fields += ("target_modules",)
    return fields


def _method(cfg: Any) -> str:
    return "dora" if getattr(cfg, "use_dora", False) else cfg.method


def _required(d: dict[str, Any], key: str, path: Path) -> Any:
    if key not in d or d[key] is None:
        raise AdapterFileError(f"{path}: required field {key!r} is missing (peft_type {d.get('peft_type')!r})")
    return d[key]


def _str_tuple(d: dict[str, Any], key: str, path: Path) -> tuple[str, ...]:
    v = d.get(key)
    items = () if v is None else (v,) if isinstance(v, str) else v
    if not isinstance(items, (list, tuple)) or not all(isinstance(x, str) for x in items):
        raise AdapterFileError(f"{path}: {key}={v!r}: must be a string or a list of strings")
    return tuple(items)


def _dict(d: dict[str, Any], key: str, path: Path) -> dict:
    v = d.get(key) or {}
    if not isinstance(v, dict):
        raise AdapterFileError(f"{path}: {key}={v!r}: must be an object")
    return v


def _bool(d: dict[str, Any], key: str, path: Path) -> bool:
    v = d.get(key, False)
    if not isinstance(v, bool):
        raise AdapterFileError(f"{path}: {key}={v!r}: must be true or false")
    return v


def _tuple(v: Any) -> tuple:
    if v is None:
        return ()
    return (v,) if isinstance(v, (str, int)) else tuple(v)


def _first(v: Any) -> str | None:
    return v[0] if isinstance(v, list) and v else (v or None)
