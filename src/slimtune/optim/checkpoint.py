"""Optimizer checkpoints as safetensors plus JSON (never pickle), written atomically.

Tensors of ``optimizer.state_dict()["state"]`` are stored as ``state.<index>.<key>``; everything else
(param groups, integer steps) goes into the file's JSON metadata.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from slimtune.atomic import atomic_file

_META = "slimtune_optimizer"


def save_optimizer(optimizer: torch.optim.Optimizer, path: str | Path) -> Path:
    """Write ``optimizer.state_dict()`` to ``path`` (a .safetensors file) via a temp file and os.replace."""
    from safetensors.torch import save_file

    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{idx}.{k}"] = v.detach().cpu().contiguous()
            elif isinstance(v, (int, float, bool)):
                scalars[f"{idx}.{k}"] = v
            else:
                raise TypeError(f"optimizer state {idx}.{k} is a {type(v).__name__}: only tensors and numbers save")
    meta = {"param_groups": sd["param_groups"], "scalars": scalars}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_file(path, lambda tmp: save_file(tensors, tmp, metadata={_META: json.dumps(meta)}))


def load_optimizer(optimizer: torch.optim.Optimizer, path: str | Path) -> None:
    """Load a file written by :func:`save_optimizer` into ``optimizer`` (same parameters, same order).

    Raises FileNotFoundError, or ValueError if the file is not a slimtune optimizer checkpoint.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path={str(path)!r}: no such optimizer checkpoint")
    with safe_open(str(path), framework="pt") as f:
        meta_json = (f.metadata() or {}).get(_META)
        if meta_json is None:
            raise ValueError(f"path={str(path)!r}: not a slimtune optimizer checkpoint (no {_META!r} metadata)")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta = json.loads(meta_json)
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = v
    for key, v in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    groups = meta["param_groups"]
    for g in groups:  # JSON turned tuples into lists
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})
