"""Reading an adapter folder from disk and validating everything that can be checked without the model.

Only JSON and safetensors are read; a pickled ``adapter_model.bin`` is refused. Every malformed input
raises ``AdapterFileError`` naming the file and what is wrong: config that is not JSON or not an object,
a missing required field, a ``peft_type`` slimtune cannot load, a truncated or corrupt safetensors file,
a tensor that is not floating point or holds NaN/inf, slimtune metadata that is not valid JSON, disagrees
with adapter_config.json, or lists other tensors than the file holds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from slimtune import fingerprint
from slimtune.config import ConfigError, config_from_dict
from slimtune.files.peft_schema import CONFIG_NAME, WEIGHTS_NAME, AdapterFileError, check_agreement, config_from_file

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class AdapterFolder:
    """A validated adapter folder. ``tensors``: PEFT key -> tensor (floating point, finite)."""

    folder: Path
    config: Any  # the slimtune config (LoraConfig, BottleneckConfig or PromptTuningConfig)
    from_slimtune: bool  # the config came from slimtune's own metadata (exact) rather than PEFT's JSON
    tensors: dict[str, Tensor]
    fingerprint: fingerprint.Fingerprint | None
    source: Path | None = None  # a one-file adapter (diffusers, kohya): its config and weights both come from it
    file_keys: dict[str, str] | None = None  # PEFT key -> the key as that file spells it, for messages

    def file_key(self, key: str) -> str:
        """``key`` (a PEFT key) as the file on disk names it."""
        return (self.file_keys or {}).get(key, key)

    @property
    def config_path(self) -> Path:
        return self.source or self.folder / CONFIG_NAME

    @property
    def weights_path(self) -> Path:
        return self.source or self.folder / WEIGHTS_NAME


def read_folder(path: str | Path) -> AdapterFolder:
    """Read and validate the adapter folder at ``path``. Raises AdapterFileError (see the module docstring)."""
    folder = Path(path)
    _check_layout(folder)
    config_dict = read_config_json(folder / CONFIG_NAME)
    tensors, meta = read_weights(folder / WEIGHTS_NAME)
    from_file = config_from_file(config_dict, folder / CONFIG_NAME)
    config, saved_fp = from_file, None
    if "slimtune_config" in meta:
        config = _meta_config(meta, folder / WEIGHTS_NAME)
        check_agreement(config, from_file, folder / CONFIG_NAME)
    if "slimtune_fingerprint" in meta:
        saved_fp = _meta_fingerprint(meta, folder / WEIGHTS_NAME)
    if "slimtune_manifest" in meta:
        check_manifest(meta, tensors, folder / WEIGHTS_NAME)
    return AdapterFolder(folder, config, "slimtune_config" in meta, tensors, saved_fp)


def _check_layout(folder: Path) -> None:
    if not folder.is_dir():
        raise AdapterFileError(f"adapter path {str(folder)!r} is not a folder")
    if not (folder / WEIGHTS_NAME).is_file():
        pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        if pickled:
            raise AdapterFileError(
                f"{folder} holds {pickled[0]}, a pickle file; slimtune never unpickles files (loading a pickle "
                "can run arbitrary code). Convert it where you trust it: "
                "safetensors.torch.save_file(torch.load(f, weights_only=True), 'adapter_model.safetensors')")
        raise AdapterFileError(f"{folder} has no {WEIGHTS_NAME}")
    if not (folder / CONFIG_NAME).is_file():
        raise AdapterFileError(f"{folder} has no {CONFIG_NAME}")


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def read_config_json(path: Path) -> Any:
    """The parsed JSON at ``path`` (UTF-8, standard JSON: no NaN/Infinity). Raises AdapterFileError."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"), parse_constant=_no_constants)
    except UnicodeDecodeError as e:
        raise AdapterFileError(f"{path}: not UTF-8 text (byte {e.start}); is the file corrupt?") from None
    except ValueError as e:  # json.JSONDecodeError is a ValueError
        raise AdapterFileError(f"{path}: not valid JSON: {e}") from None


def read_weights(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and header metadata of the safetensors file at ``path``, each tensor checked to be a
    floating-point dtype and finite. Raises AdapterFileError for a truncated/corrupt file or a bad tensor."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
        # the parser's own errors for a bad header, a size that does not match the header, an unknown dtype
        raise AdapterFileError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None
    for key, t in tensors.items():
        if t.dtype not in FLOAT_DTYPES:
            raise AdapterFileError(f"{path}: tensor {key!r} has dtype {t.dtype}; adapter tensors must be one of "
                                   f"{', '.join(str(d) for d in FLOAT_DTYPES)}")
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise AdapterFileError(f"{path}: tensor {key!r} holds {bad} NaN/inf values of {t.numel()}; "
                                   "the adapter is broken (diverged training or a corrupt file)")
    return tensors, meta


def meta_json(meta: dict[str, str], key: str, path: Path, want: type) -> Any:
    try:
        value = json.loads(meta[key], parse_constant=_no_constants)
    except ValueError as e:
        raise AdapterFileError(f"{path}: metadata {key!r} is not valid JSON: {e}") from None
    if not isinstance(value, want):
        raise AdapterFileError(f"{path}: metadata {key!r} must be a JSON {want.__name__}, got {type(value).__name__}")
    return value


def _meta_config(meta: dict[str, str], path: Path) -> Any:
    data = meta_json(meta, "slimtune_config", path, dict)
    try:
        return config_from_dict(data)
    except (ConfigError, TypeError, ValueError) as e:
        raise AdapterFileError(f"{path}: metadata 'slimtune_config' is not a valid slimtune config: {e}") from None


def _meta_fingerprint(meta: dict[str, str], path: Path) -> fingerprint.Fingerprint:
    data = meta_json(meta, "slimtune_fingerprint", path, dict)
    try:
        return fingerprint.Fingerprint.from_json(data)
    except (KeyError, TypeError, ValueError) as e:
        raise AdapterFileError(f"{path}: metadata 'slimtune_fingerprint' is malformed: {e!r}") from None


def check_manifest(meta: dict[str, str], tensors: dict[str, Tensor], path: Path) -> None:
    listed = meta_json(meta, "slimtune_manifest", path, list)
    if sorted(map(str, listed)) != sorted(tensors):
        extra, lacking = sorted(set(tensors) - set(map(str, listed))), sorted(set(map(str, listed)) - set(tensors))
        raise AdapterFileError(f"{path}: the tensors do not match slimtune's manifest: {len(lacking)} listed but "
                               f"absent (e.g. {lacking[:2]}), {len(extra)} present but unlisted (e.g. {extra[:2]})")
