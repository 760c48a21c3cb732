"""Writing an adapter folder: ``adapter_config.json`` + ``adapter_model.safetensors``, atomically.

slimtune's own metadata (version, config, base-model fingerprint and a manifest of keys) goes in the
safetensors header, which PEFT ignores; reading checks it against adapter_config.json and the tensors.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable

from safetensors.torch import save_file
from torch import nn

from slimtune.files.keys import adapter_tensors, config_of, model_fingerprint
from slimtune.files.peft_schema import CONFIG_NAME, WEIGHTS_NAME, peft_config_dict
from slimtune.version import __version__


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
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
    files (or nothing), never a truncated one. Raises ValueError for an unknown adapter name and
    RuntimeError while adapters are merged.
    """
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
    return folder
