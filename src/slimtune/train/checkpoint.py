"""Atomic, validated training checkpoints: ``run_dir/checkpoints/step-N/``.

A checkpoint folder holds (nothing pickled; only safetensors and JSON are read back):

    trainable.safetensors   every parameter with requires_grad, under model.named_parameters() names: what
                            load_checkpoint copies back, in place, into the existing (already injected) model
    adapter/                the PEFT folder (slimtune.save_adapter) when ``adapter_name`` is a slimtune adapter
                            of the model: a usable adapter per checkpoint; written, never read back here
    optimizer.safetensors   slimtune.save_optimizer (AdamW, AdamW8bit, OffloadedOptimizer)
    scheduler.json          the LR scheduler's state_dict (plain numbers)
    sampler.json            EpochSampler.state(): the data position
    rng.safetensors         torch CPU generator state (uint8), plus ``cuda.<i>`` per CUDA device
    rng.json                Python ``random`` and NumPy global states as JSON lists
    rng.rank<r>.*           the same two files for rank r >= 1 of a multi-process run (each rank resumes its own)
    state.json              {"format": 1, "step": N, "world_size": W, "extra": {...}}
    complete                the marker, written last

Writing: everything goes into ``checkpoints/.step-N.tmp-<random>/``, each file fsynced, the folder fsynced,
renamed to ``step-N``, the parent fsynced, and only then the ``complete`` marker is written and fsynced.
``latest_checkpoint`` only returns folders with the marker, so a save killed at any moment is never
picked up; leftovers (temp folders, unmarked step folders) are removed at the next save, and older
checkpoints are pruned to ``keep_last`` only after the new one is complete (a pruned folder loses its
marker first, so a prune killed half-way leaves nothing that looks complete).

Test hook: when the environment variable ``SLIMTUNE_TEST_CHECKPOINT_SLEEP`` holds a number of seconds,
``save_checkpoint`` sleeps that long after each file and before the rename and the marker, so a test can
kill the process in the middle of a write. Unset (the default), it costs nothing.

Several processes (``slimtune.train.distributed``): every rank calls ``save_checkpoint`` (the ranks' RNG states
are gathered to rank 0), rank 0 alone writes; every rank loads the same folder, and its own RNG files.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slimtune.optim import load_optimizer, save_optimizer
from slimtune.train.checkpoint_read import (
    CheckpointError, check_optimizer_file, read_json, read_rng, read_scheduler, read_state, read_trainable,
    rng_files,
)
from slimtune.train.distributed import World
from slimtune.train.sampler import EpochSampler, check_sampler_state

__all__ = ["CheckpointError", "MARKER", "SLEEP_ENV", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]

MARKER = "complete"
SLEEP_ENV = "SLIMTUNE_TEST_CHECKPOINT_SLEEP"
STEP_DIR = re.compile(r"step-(\d+)")
LEFTOVER = re.compile(r"\.step-\d+\.tmp-.+")


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest (highest step) COMPLETE checkpoint folder under ``run_dir/checkpoints``, or None."""
    done = complete_checkpoints(Path(run_dir) / "checkpoints")
    return done[-1][1] if done else None


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every ``step-N`` folder holding the marker, by step."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := STEP_DIR.fullmatch(p.name)) and p.is_dir() and (p / MARKER).is_file()]
    return sorted(found)


def save_checkpoint(run_dir: str | os.PathLike, step: int, *, model: nn.Module, adapter_name: str,
                    optimizer: torch.optim.Optimizer, scheduler: Any, sampler: EpochSampler,
                    extra: dict | None = None, keep_last: int = 2, world: World = World()) -> Path | None:
    """Write ``run_dir/checkpoints/step-<step>/`` atomically (see the module docstring); returns it (None on
    the ranks other than 0 of a multi-process ``world``, which only send their RNG states: call it on every rank).

    ``extra`` must be JSON-serialisable; it comes back from :func:`load_checkpoint`. Raises ValueError for
    a bad step / keep_last or an extra that is not JSON, TypeError for optimizer or scheduler state that
    is not numbers and tensors; on any error no complete checkpoint is added and the temp folder is removed.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step={step!r}: must be a non-negative integer")
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
        raise ValueError(f"keep_last={keep_last!r}: must be a positive integer")
    rng = capture_rng()  # first: nothing below may draw from the global generators before it is taken
    state = {"format": 1, "step": step, "world_size": world.world_size, "extra": dict(extra or {})}
    try:
        state_json = json.dumps(state, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"extra={extra!r}: must be JSON-serialisable ({exc})") from None
    try:
        ranks = world.gather({"tensors": rng["tensors"], "json": rng["json"]})  # collective: every rank is here
        if not world.is_main:
            return None
        return write_checkpoint(Path(run_dir) / "checkpoints", step, model, adapter_name, optimizer, scheduler,
                                sampler, ranks, state_json, keep_last)
    finally:  # the live run continues from exactly the saved RNG state, even if something in the save drew
        set_rng(rng["raw"])


def write_checkpoint(root: Path, step: int, model: nn.Module, adapter_name: str, optimizer: torch.optim.Optimizer,
                     scheduler: Any, sampler: EpochSampler, rng: list[dict], state_json: str, keep_last: int) -> Path:
    """The save itself: clean up, temp folder, files, rename, marker, prune."""
    root.mkdir(parents=True, exist_ok=True)
    remove_leftovers(root)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".step-{step}.tmp-"))
    try:
        write_contents(tmp, model, adapter_name, optimizer, scheduler, sampler, rng, state_json)
        final = root / f"step-{step}"
        if final.exists():
            retire(final)
        os.rename(tmp, final)
        fsync_path(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pause_for_tests()
    write_file(final / MARKER, lambda p: Path(p).write_text(f"step {step}\n"))
    fsync_path(final)
    prune(root, step, keep_last)
    return final


def write_contents(folder: Path, model: nn.Module, adapter_name: str, optimizer: torch.optim.Optimizer,
                   scheduler: Any, sampler: EpochSampler, rng: list[dict], state_json: str) -> None:
    """Every checkpoint file into ``folder``, each fsynced, then the folder itself. ``rng``: each rank's
    ``{"tensors", "json"}`` RNG state, by rank."""
    from safetensors.torch import save_file

    trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    write_file(folder / "trainable.safetensors", lambda p: save_file(trainable, p))
    if adapter_name in getattr(model, "slimtune_configs", {}):
        from slimtune.files import save_adapter

        adapter = save_adapter(model, folder / "adapter", adapter_name)
        for f in sorted(adapter.iterdir()):
            fsync_path(f)
        fsync_path(adapter)
        pause_for_tests()
    write_file(folder / "optimizer.safetensors", lambda p: save_optimizer(optimizer, p))
    write_file(folder / "scheduler.json", lambda p: Path(p).write_text(to_json(scheduler.state_dict(), "scheduler")))
    write_file(folder / "sampler.json", lambda p: Path(p).write_text(json.dumps(sampler.state())))
    for rank, state in enumerate(rng):
        tensors_path, json_path = rng_files(folder, rank)
        write_file(tensors_path, lambda p: save_file(state["tensors"], p))
        write_file(json_path, lambda p: Path(p).write_text(json.dumps(state["json"])))
    write_file(folder / "state.json", lambda p: Path(p).write_text(state_json))
    fsync_path(folder)
    pause_for_tests()


def to_json(d: dict, what: str) -> str:
    try:
        return json.dumps(d)
    except TypeError as exc:
        raise TypeError(f"{what} state is not plain numbers and lists, cannot save it as JSON: {exc}") from None


def write_file(path: Path, write: Any) -> None:
    """``write(path)`` then fsync the file (and the test hook's pause)."""
    write(path)
    fsync_path(path)
    pause_for_tests()


def fsync_path(path: Path) -> None:
    """fsync a file, or a folder (so renames and new entries in it are durable; POSIX only)."""
    if path.is_dir() and os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pause_for_tests() -> None:
    """Sleep ``$SLIMTUNE_TEST_CHECKPOINT_SLEEP`` seconds when set: lets tests kill a save mid-write."""
    delay = os.environ.get(SLEEP_ENV)
    if delay:
        time.sleep(float(delay))


def remove_leftovers(root: Path) -> None:
    """Remove temp folders of interrupted saves and step folders that never got their marker."""
    for p in root.iterdir():
        stale = LEFTOVER.fullmatch(p.name) or (STEP_DIR.fullmatch(p.name) and not (p / MARKER).exists())
        if stale and p.is_dir():
            shutil.rmtree(p)
    fsync_path(root)


def retire(folder: Path) -> None:
    """Delete a checkpoint folder so that no moment of the deletion looks complete: the marker goes first."""
    (folder / MARKER).unlink(missing_ok=True)
    fsync_path(folder)
    shutil.rmtree(folder)


def prune(root: Path, step: int, keep_last: int) -> None:
    """Keep the newest ``keep_last`` complete checkpoints up to ``step`` (the one just written included)."""
    older = [p for s, p in complete_checkpoints(root) if s < step]
    for p in older[:max(0, len(older) - (keep_last - 1))]:
        retire(p)
    fsync_path(root)


def capture_rng() -> dict:
    """The global RNG states: torch CPU (and CUDA) as tensors, Python and NumPy as JSON-able lists."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    tensors = {"torch": torch.get_rng_state(), **{f"cuda.{i}": s for i, s in enumerate(cuda)}}
    version, words, gauss = py = random.getstate()
    name, keys, pos, has_gauss, cached = npy = np.random.get_state()
    return {"tensors": tensors, "raw": {"torch": tensors["torch"], "cuda": cuda, "python": py, "numpy": npy},
            "json": {"python": [version, list(words), gauss],
                     "numpy": [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]}}


def load_checkpoint(path: str | os.PathLike, *, model: nn.Module, adapter_name: str,
                    optimizer: torch.optim.Optimizer, scheduler: Any, sampler: EpochSampler,
                    world: World = World()) -> dict:
    """Restore a complete checkpoint: trainable tensors (in place), optimizer, scheduler, sampler and the
    global RNGs (torch, CUDA, Python, NumPy; this rank's). Returns ``{"step": N, **extra}``.

    Everything is read and checked before anything is changed: a missing folder, marker or file, an
    unreadable file, a step that disagrees with the folder name, tensor names, shapes or dtypes that do
    not match the model's trainable parameters (or the optimizer's), a malformed scheduler, sampler or RNG
    state all raise CheckpointError naming the file, and leave model, optimizer, scheduler, sampler and
    RNGs as they were. ``adapter_name`` must name a slimtune adapter of the model when the checkpoint
    holds an adapter folder; a checkpoint written by another number of processes than ``world.world_size``
    is refused (each rank's RNG state and the effective batch belong to that number).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {str(folder)!r}: no such folder")
    if not (folder / MARKER).is_file():
        raise CheckpointError(f"checkpoint {str(folder)!r}: no {MARKER!r} marker, the save never finished")
    if (folder / "adapter").is_dir() and adapter_name not in getattr(model, "slimtune_configs", {}):
        raise CheckpointError(f"checkpoint {str(folder)!r} holds an adapter, but the model has no adapter "
                              f"named {adapter_name!r}")
    state = read_state(folder / "state.json", folder.name)
    written_by = state.get("world_size", 1)
    if written_by != world.world_size:
        raise CheckpointError(f"{folder / 'state.json'}: world_size={written_by!r}: the checkpoint was written by "
                              f"{written_by} processes, this run has {world.world_size}; resume with "
                              f"--nproc {written_by} (torchrun --nproc_per_node {written_by})")
    tensors = read_trainable(folder / "trainable.safetensors", model)
    check_optimizer_file(folder / "optimizer.safetensors", optimizer)
    sched = read_scheduler(folder / "scheduler.json", scheduler)
    samp = read_json(folder / "sampler.json")
    try:
        check_sampler_state(samp, sampler.n, sampler.batch_size, sampler.seed)
    except ValueError as exc:
        raise CheckpointError(f"{folder / 'sampler.json'}: {exc}") from None
    rng = read_rng(folder, world.rank)
    restore_all(folder, model, tensors, optimizer, scheduler, sched, sampler, samp, rng)
    return {"step": state["step"], **state["extra"]}


def restore_all(folder: Path, model: nn.Module, tensors: dict, optimizer: torch.optim.Optimizer, scheduler: Any,
                sched: dict, sampler: EpochSampler, samp: dict, rng: dict) -> None:
    """The writes, after every check passed; the optimizer (the only step left that could refuse) first."""
    try:
        load_optimizer(optimizer, folder / "optimizer.safetensors")
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{folder / 'optimizer.safetensors'}: cannot load into this optimizer: {exc}") from None
    scheduler.load_state_dict(sched)
    sampler.load_state(samp)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t)
    set_rng(rng)


def set_rng(rng: dict) -> None:
    """Set the global generators from ``{"torch", "cuda": [...], "python", "numpy"}`` (CUDA states only
    where there are CUDA devices: a CPU resume of a GPU run skips them)."""
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        for i, s in enumerate(rng["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
