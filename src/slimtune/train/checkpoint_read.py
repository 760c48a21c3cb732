"""Reading and checking a checkpoint's files before anything is restored (see ``checkpoint.py``).

Every function here only reads: it returns validated contents or raises CheckpointError naming the file,
the field or tensor, the value and what was expected.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

OPTIMIZER_META = "slimtune_optimizer"  # the metadata key slimtune.optim.save_optimizer writes
# optimizer state tensors that have their parameter's shape (torch AdamW / SGD, slimtune AdamW8bit)
PARAM_SHAPED = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "exp_avg_codes",
                "exp_avg_sq_codes")
MT_WORDS = 624  # Mersenne Twister state words (Python keeps one more: the position)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the message names the file and what is wrong with it."""


def read_json(path: Path) -> dict:
    """The JSON object in ``path``; CheckpointError when missing, not JSON or not an object."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (the checkpoint is incomplete)")
    try:
        d = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: must hold a JSON object, found {type(d).__name__}")
    return d


def read_tensors(path: Path) -> dict[str, Tensor]:
    """Every tensor in a safetensors file; CheckpointError when missing, truncated or corrupt."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"{path}: missing (the checkpoint is incomplete)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


def read_state(path: Path, folder_name: str) -> dict:
    """state.json: ``{"format": 1, "step": N, "extra": {...}}`` with N matching the ``step-N`` folder name."""
    d = read_json(path)
    m = re.fullmatch(r"step-(\d+)", folder_name)
    want = int(m.group(1)) if m else None
    step = d.get("step")
    if d.get("format") != 1:
        raise CheckpointError(f"{path}: format={d.get('format')!r}: only format 1 is known")
    if isinstance(step, bool) or not isinstance(step, int) or (want is not None and step != want):
        raise CheckpointError(f"{path}: step={step!r}: must be the folder's step {want}")
    if not isinstance(d.get("extra"), dict):
        raise CheckpointError(f"{path}: extra={d.get('extra')!r}: must be an object")
    return d


def read_trainable(path: Path, model: nn.Module) -> dict[str, Tensor]:
    """trainable.safetensors, checked name by name against the model's parameters with requires_grad."""
    tensors = read_tensors(path)
    live = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unknown = sorted(set(live) - set(tensors)), sorted(set(tensors) - set(live))
    if missing or unknown:
        raise CheckpointError(f"{path}: tensors do not match the model's trainable parameters; "
                              f"missing {missing[:5]}, not trainable in the model {unknown[:5]}")
    for name, t in tensors.items():
        p = live[name]
        if t.shape != p.shape or t.dtype != p.dtype:
            raise CheckpointError(f"{path}: tensor {name!r} is {t.dtype} {tuple(t.shape)}; the model's is "
                                  f"{p.dtype} {tuple(p.shape)}")
    return tensors


def check_optimizer_file(path: Path, optimizer: torch.optim.Optimizer) -> None:
    """optimizer.safetensors fits ``optimizer``: same groups and group sizes, state indices in range,
    parameter-shaped state tensors of their parameter's shape."""
    from safetensors import SafetensorError, safe_open

    tensors = read_tensors(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[OPTIMIZER_META])
        groups = meta["param_groups"]
        sizes = [len(g["params"]) for g in groups]
    except (SafetensorError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not a slimtune optimizer checkpoint ({exc!r})") from None
    want = [len(g["params"]) for g in optimizer.param_groups]
    if sizes != want:
        raise CheckpointError(f"{path}: parameter groups of sizes {sizes}; this optimizer's are {want}")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for key, t in tensors.items():
        parts = key.split(".", 2)
        if len(parts) != 3 or parts[0] != "state" or not parts[1].isdigit() or int(parts[1]) >= len(params):
            raise CheckpointError(f"{path}: tensor {key!r}: must be state.<index < {len(params)}>.<name>")
        p = params[int(parts[1])]
        if parts[2] in PARAM_SHAPED and t.shape != p.shape:
            raise CheckpointError(f"{path}: tensor {key!r} has shape {tuple(t.shape)}; its parameter's is "
                                  f"{tuple(p.shape)}")


def read_scheduler(path: Path, scheduler: Any) -> dict:
    """scheduler.json with the same keys as ``scheduler.state_dict()`` and one base lr per group."""
    d = read_json(path)
    want = scheduler.state_dict()
    if set(d) != set(want):
        raise CheckpointError(f"{path}: keys {sorted(d)}; this scheduler's are {sorted(want)}")
    if "base_lrs" in want and (not isinstance(d["base_lrs"], list) or len(d["base_lrs"]) != len(want["base_lrs"])):
        raise CheckpointError(f"{path}: base_lrs={d['base_lrs']!r}: must list {len(want['base_lrs'])} learning rates")
    epoch = d.get("last_epoch", 0)
    if isinstance(epoch, bool) or not isinstance(epoch, int):
        raise CheckpointError(f"{path}: last_epoch={epoch!r}: must be an integer")
    return d


def rng_files(folder: Path, rank: int = 0) -> tuple[Path, Path]:
    """The RNG files of process ``rank``: ``rng.safetensors`` / ``rng.json`` for rank 0 (and a single process),
    ``rng.rank<r>.safetensors`` / ``rng.rank<r>.json`` for the other ranks of a multi-process run."""
    stem = "rng" if rank == 0 else f"rng.rank{rank}"
    return folder / f"{stem}.safetensors", folder / f"{stem}.json"


def read_rng(folder: Path, rank: int = 0) -> dict:
    """The RNG files of ``rank`` (rng_files), checked: ``{"torch", "cuda": [...], "python", "numpy"}`` ready
    to set."""
    import numpy as np

    tpath, jpath = rng_files(folder, rank)
    tensors = read_tensors(tpath)
    cpu = tensors.get("torch")
    want = torch.get_rng_state()
    if cpu is None or cpu.dtype != torch.uint8 or cpu.shape != want.shape:
        got = None if cpu is None else f"{cpu.dtype} {tuple(cpu.shape)}"
        raise CheckpointError(f"{tpath}: 'torch' state is {got}; must be uint8 {tuple(want.shape)}")
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors)) if f"cuda.{i}" in tensors]
    d = read_json(jpath)
    py, npy = d.get("python"), d.get("numpy")
    if not (isinstance(py, list) and len(py) == 3 and py[0] == 3 and _words(py[1], MT_WORDS + 1)
            and (py[2] is None or isinstance(py[2], float))):
        raise CheckpointError(f"{jpath}: python: must be [3, {MT_WORDS + 1} integers in [0, 2^32), null or float]")
    if not (isinstance(npy, list) and len(npy) == 5 and npy[0] == "MT19937" and _words(npy[1], MT_WORDS)
            and isinstance(npy[2], int) and 0 <= npy[2] <= MT_WORDS and npy[3] in (0, 1)
            and isinstance(npy[4], (int, float))):
        raise CheckpointError(f"{jpath}: numpy: must be ['MT19937', {MT_WORDS} integers in [0, 2^32), "
                              f"pos in [0, {MT_WORDS}], has_gauss 0 or 1, cached float]")
    return {"torch": cpu, "cuda": cuda, "python": (3, tuple(py[1]), py[2]),
            "numpy": ("MT19937", np.array(npy[1], dtype=np.uint32), npy[2], npy[3], float(npy[4]))}


def _words(v: Any, n: int) -> bool:
    return (isinstance(v, list) and len(v) == n
            and all(isinstance(w, int) and not isinstance(w, bool) and 0 <= w < 2**32 for w in v))
