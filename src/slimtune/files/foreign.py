"""One-file adapters (diffusers' ``pytorch_lora_weights.safetensors``, kohya's ``lora_unet_...`` files) read
into the same ``AdapterFolder`` a PEFT folder becomes, so ``files.load`` loads every format by one path.

A file's format is told by its keys (``diffusers_keys.file_format``). Its ``LoraConfig`` comes, in order of
trust, from slimtune's own header entry (exact, with the base-model fingerprint), diffusers'
``lora_adapter_metadata`` (PEFT's LoraConfig fields), or the tensors themselves: the rank from A's shape and
alpha from kohya's ``.alpha`` tensors, else alpha = r as diffusers and kohya's sd-scripts assume. Targets are
the full module names the file holds, with a ``rank_pattern``/``alpha_pattern`` entry for each module whose
rank or alpha differs from the most common one. Every problem is an ``AdapterFileError`` naming the file.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from slimtune import fingerprint
from slimtune.config import ConfigError, LoraConfig, config_from_dict
from slimtune.files import kohya_keys
from slimtune.files.diffusers_keys import (DIFFUSERS_WEIGHTS_NAME, METADATA_KEY, PEFT_PREFIX, KeyFormatError,
                                           component_of, file_format, split_components, unpack_metadata,
                                           without_text_model)
from slimtune.files.peft_schema import CONFIG_NAME, WEIGHTS_NAME, AdapterFileError, lora_config_from_peft
from slimtune.files.read import AdapterFolder, check_manifest, meta_json, read_folder, read_weights
from slimtune.injection import candidate_modules

SLIMTUNE_COMPONENTS = "slimtune_components"  # header entry: component -> {"config": ..., "fingerprint": ...}


def read_any(path: str | Path, model: nn.Module, component: str | None = None) -> AdapterFolder:
    """The adapter at ``path`` for ``model``: a PEFT folder, or a diffusers / kohya file (or a folder holding
    ``pytorch_lora_weights.safetensors``). ``component`` picks the part of a multi-part file (default: by the
    model's class, see ``diffusers_keys.component_of``). Raises AdapterFileError."""
    p = Path(path)
    if p.is_dir() and not (p / WEIGHTS_NAME).is_file() and (p / DIFFUSERS_WEIGHTS_NAME).is_file():
        p = p / DIFFUSERS_WEIGHTS_NAME
    if not p.is_file():
        return read_folder(p)  # a PEFT folder (or the folder's own named error)
    tensors, meta = read_weights(p)
    try:
        fmt = file_format(tensors)
        if fmt == "peft":
            raise AdapterFileError(f"{p} holds PEFT keys; a PEFT adapter is a folder with {CONFIG_NAME} beside "
                                   f"{WEIGHTS_NAME}: pass the folder")
        if fmt == "kohya":
            return _read_kohya(p, tensors, model, component)
        return _read_diffusers(p, tensors, meta, model, component)
    except (KeyFormatError, ConfigError) as e:
        raise AdapterFileError(f"{p}: {e}") from None


def _pick(available: list[str], model: nn.Module, component: str | None, path: Path) -> str:
    """The component of the file this model takes."""
    try:
        wanted = component_of(type(model).__name__, component)
    except ValueError as e:
        raise AdapterFileError(f"{path} holds LoRA for {', '.join(available)}: {e}") from None
    if wanted not in available:
        raise AdapterFileError(f"{path} holds LoRA for {', '.join(available)}, not for the {wanted} "
                               f"({type(model).__name__}); pass component= to choose")
    return wanted


def _read_diffusers(path: Path, tensors: dict[str, Tensor], meta: dict[str, str], model: nn.Module,
                    component: str | None) -> AdapterFolder:
    parts = split_components(tensors)
    comp = None if None in parts else _pick(sorted(parts), model, component, path)
    flat_clip = not hasattr(model, "text_model")  # a transformers-5 CLIPTextModel (or a UNet: no such keys)
    names = {without_text_model(peft_key) if flat_clip else peft_key: key for key, peft_key in parts[comp].items()}
    peft_tensors = {peft_key: tensors[key] for peft_key, key in names.items()}
    if "slimtune_manifest" in meta:
        check_manifest(meta, tensors, path)
    own = _slimtune_entry(meta, comp, path)
    if own is not None:
        return AdapterFolder(path.parent, own[0], True, peft_tensors, own[1], source=path, file_keys=names)
    fields = _diffusers_fields(meta, comp, path)
    if fields is not None:
        config = lora_config_from_peft({"peft_type": "LORA", **fields}, path)
    else:  # no hyperparameters in the file: diffusers' convention, scale 1
        ranks = {k[len(PEFT_PREFIX):-len(".lora_A.weight")]: int(t.shape[0])
                 for k, t in peft_tensors.items() if k.endswith(".lora_A.weight")}
        dora = any(k.endswith(".lora_magnitude_vector") for k in peft_tensors)
        config = inferred_config(ranks, {n: float(r) for n, r in ranks.items()}, dora)
    return AdapterFolder(path.parent, config, False, peft_tensors, None, source=path, file_keys=names)


def _slimtune_entry(meta: dict[str, str], comp: str | None, path: Path) -> tuple[Any, Any] | None:
    """(config, fingerprint) slimtune wrote for ``comp``, or None."""
    if SLIMTUNE_COMPONENTS not in meta or comp is None:
        return None
    entry = meta_json(meta, SLIMTUNE_COMPONENTS, path, dict).get(comp)
    if entry is None:
        return None
    try:
        return config_from_dict(entry["config"]), fingerprint.Fingerprint.from_json(entry["fingerprint"])
    except (ConfigError, KeyError, TypeError, ValueError) as e:
        raise AdapterFileError(f"{path}: metadata {SLIMTUNE_COMPONENTS!r} for {comp} is malformed: {e!r}") from None


def _diffusers_fields(meta: dict[str, str], comp: str | None, path: Path) -> dict[str, Any] | None:
    if METADATA_KEY not in meta:
        return None
    try:
        return unpack_metadata(meta[METADATA_KEY], comp)
    except ValueError as e:  # json's errors are ValueErrors too
        raise AdapterFileError(f"{path}: metadata {METADATA_KEY!r} is not valid: {e}") from None


def _read_kohya(path: Path, tensors: dict[str, Tensor], model: nn.Module, component: str | None) -> AdapterFolder:
    parsed = [kohya_keys.parse(k) for k in tensors]
    comp = _pick(sorted({p.component for p in parsed}), model, component, path)
    roles: dict[str, dict[str, Tensor]] = {}
    stems = {}  # flat -> the key stem as the file spells it, for messages
    for p in parsed:
        if p.component == comp:
            roles.setdefault(p.flat, {})[p.role] = tensors[p.key]
            stems[p.flat] = p.key.partition(".")[0]
    with_alpha = [flat for flat, r in roles.items() if "alpha" in r]
    names = kohya_keys.resolve(roles, [n for n, _ in candidate_modules(model)], comp)
    out, ranks, alphas, file_keys = {}, {}, {}, {}
    for flat, r in roles.items():
        stem = stems[flat]
        lacking = [role for role in ("A", "B") + (("alpha",) if with_alpha else ()) if role not in r]
        if lacking:
            suffix = {"A": "lora_down.weight", "B": "lora_up.weight", "alpha": "alpha"}[lacking[0]]
            why = f" while {len(with_alpha)} other modules have one" if lacking[0] == "alpha" else ""
            raise AdapterFileError(f"{path}: {stem}.{suffix} is missing{why}: the file is incomplete")
        name = names[flat]
        ranks[name] = int(r["A"].shape[0])
        alphas[name] = _scalar(r["alpha"], f"{stem}.alpha", path) if with_alpha else float(ranks[name])
        for role, part in (("A", "lora_down.weight"), ("B", "lora_up.weight")):
            out[f"{PEFT_PREFIX}{name}.lora_{role}.weight"] = r[role]
            file_keys[f"{PEFT_PREFIX}{name}.lora_{role}.weight"] = f"{stem}.{part}"
    return AdapterFolder(path.parent, inferred_config(ranks, alphas, False), False, out, None, source=path,
                         file_keys=file_keys)


def _scalar(t: Tensor, key: str, path: Path) -> float:
    if t.numel() != 1 or not float(t.reshape(())) > 0:
        raise AdapterFileError(f"{path}: {key} must be one positive number, got shape {tuple(t.shape)}"
                               + (f" value {float(t.reshape(()))}" if t.numel() == 1 else ""))
    return float(t.reshape(()))


def inferred_config(ranks: dict[str, int], alphas: dict[str, float], dora: bool) -> LoraConfig:
    """A LoraConfig targeting exactly the named modules (full names), with per-module ranks and alphas: the
    most common as ``r``/``alpha``, the rest in ``rank_pattern``/``alpha_pattern``. Raises ConfigError."""
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    alpha = int(alpha) if float(alpha).is_integer() else alpha
    return LoraConfig(r=r, alpha=alpha, target_modules=tuple(sorted(ranks)), use_dora=dora,
                      rank_pattern={n: v for n, v in ranks.items() if v != r},
                      alpha_pattern={n: v for n, v in alphas.items() if v != alpha})


def components_in(path: str | Path) -> list[str]:
    """The components (``unet``, ``text_encoder``...) a diffusers or kohya LoRA file holds weights for.
    Raises AdapterFileError for a file of another format or one whose keys name no component."""
    p = Path(path)
    p = p / DIFFUSERS_WEIGHTS_NAME if p.is_dir() else p
    if not p.is_file():
        raise AdapterFileError(f"{p}: no such LoRA file")
    tensors, _ = read_weights(p)
    try:
        fmt = file_format(tensors)
        if fmt == "kohya":
            return sorted({kohya_keys.parse(k).component for k in tensors})
        parts = split_components(tensors) if fmt == "diffusers" else {None: {}}
    except KeyFormatError as e:
        raise AdapterFileError(f"{p}: {e}") from None
    if None in parts:
        raise AdapterFileError(f"{p}: its keys name no pipeline part ({fmt} format); load it into one model with "
                               "slimtune.load_adapter(model, path)")
    return sorted(parts)
