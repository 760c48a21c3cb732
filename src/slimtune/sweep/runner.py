"""Running a sweep: each combination is a ``slimtune train`` process in ``output_dir/sweep/<run>/``, resumable.

A run is finished when its ``result.json`` exists (written last, atomically): a rerun of the sweep skips it. A run
killed part way has checkpoints and no result: it continues with ``--resume``. Each run is its own process, so
its peak resident memory is measured (``os.wait4``'s ``ru_maxrss``) and a crash leaves the other runs alone.
Where runs go is one function, :func:`assign_devices` (several devices: one run per device at a time).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from slimtune.sweep.grid import Axis, combinations, run_name
from slimtune.train.config import RunConfig, RunConfigError, load_run_config

RESULT = "result.json"


class SweepError(ValueError):
    """A sweep that cannot start: combinations whose run configs are invalid; ``issues`` lists every problem as
    ``run NAME: problem``, one per line of the message."""

    def __init__(self, issues: Sequence[str]) -> None:
        self.issues: tuple[str, ...] = tuple(issues)
        super().__init__("\n".join(self.issues))


@dataclass(frozen=True)
class SweepRun:
    """One combination: its folder name, ``{key: value text}`` and the overrides ``slimtune train`` gets."""

    name: str
    combo: dict[str, str]
    overrides: tuple[str, ...]
    cfg: RunConfig
    run_dir: Path


@dataclass
class SweepResult:
    sweep_dir: Path
    rows: list[dict[str, Any]] = field(default_factory=list)  # finished runs, in grid order
    failed: list[str] = field(default_factory=list)  # runs whose process failed: "name: last log line"
    skipped: list[str] = field(default_factory=list)  # finished before this call


def plan_runs(config: str | None, axes: Sequence[Axis], budget_steps: int | None = None,
              overrides: Sequence[str] = ()) -> tuple[Path, list[SweepRun]]:
    """(sweep folder, every run), each run config checked (files included) before anything runs.

    Raises SweepError listing every problem as ``run NAME: issue``, RunConfigError for the base config.
    """
    base = load_run_config(config, overrides, check_files=True)
    sweep_dir = Path(base.output_dir) / "sweep"
    budget = [f"train.max_steps={budget_steps}", "train.epochs=null"] if budget_steps else []
    runs, issues = [], []
    for i, combo in enumerate(combinations(axes), 1):
        name = run_name(i, combo)
        run_dir = sweep_dir / name
        ov = (*overrides, *budget, *(f"{k}={v}" for k, v in combo.items()), f"output_dir={run_dir}")
        try:
            runs.append(SweepRun(name, combo, ov, load_run_config(config, ov, check_files=True), run_dir))
        except RunConfigError as e:
            issues += [f"run {name}: {issue}" for issue in e.issues]
    if issues:
        raise SweepError(issues)
    return sweep_dir, runs


def assign_devices(n_runs: int, devices: Sequence[str]) -> list[str]:
    """The device of each run: round robin over ``devices`` (``["cpu"]`` when empty), so with several devices
    each holds every k-th run and runs its share one after another."""
    devices = list(devices) or ["cpu"]
    return [devices[i % len(devices)] for i in range(n_runs)]


def local_devices() -> list[str]:
    """``cuda:0``, ``cuda:1``, ... when there are GPUs, else ``cpu``."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [f"cuda:{i}" for i in range(n)] or ["cpu"]


def is_finished(run_dir: Path) -> bool:
    return (run_dir / RESULT).is_file()


def train_command(config: str | None, run: SweepRun, resume: bool) -> list[str]:
    """The ``slimtune train`` process of one run."""
    return [sys.executable, "-m", "slimtune", "train", *([config] if config else []), *run.overrides,
            *(["--resume"] if resume else [])]


def device_env(device: str) -> dict[str, str]:
    """The environment of a run on ``device``: ``cuda:K`` sees only GPU K; ``cpu`` sees none."""
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1] if device.startswith("cuda:") else ""
    return env


def execute(config: str | None, run: SweepRun, device: str, log: Callable[[str], None]) -> dict[str, Any] | str:
    """Train one run to the end (resuming its checkpoints); its result row, or the failure's last log line."""
    from slimtune.sweep.results import collect_row
    from slimtune.train.checkpoint import latest_checkpoint

    run.run_dir.mkdir(parents=True, exist_ok=True)
    resume = latest_checkpoint(run.run_dir) is not None
    log(f"sweep: {run.name} on {device}{' (resuming)' if resume else ''}")
    start = time.perf_counter()
    with open(run.run_dir / "train.log", "a", encoding="utf-8") as out:
        proc = subprocess.Popen(train_command(config, run, resume), stdout=out, stderr=subprocess.STDOUT,
                                env=device_env(device))
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        lines = (run.run_dir / "train.log").read_text(encoding="utf-8", errors="replace").strip().splitlines()
        return f"{run.name}: exit {proc.returncode}: {lines[-1] if lines else 'no output'}"
    # ru_maxrss: kilobytes on Linux, bytes on macOS
    rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return collect_row(run, wall, rss)


def run_sweep(config: str | None, axes: Sequence[Axis], budget_steps: int | None = None,
              overrides: Sequence[str] = (), devices: Sequence[str] | None = None,
              log: Callable[[str], None] = print) -> SweepResult:
    """Run every combination not finished yet, then write results.md, results.csv and results.png.

    Raises SweepError / RunConfigError before any run starts (see :func:`plan_runs`).
    """
    from slimtune.sweep.results import write_results

    sweep_dir, runs = plan_runs(config, axes, budget_steps, overrides)
    result = SweepResult(sweep_dir, skipped=[r.name for r in runs if is_finished(r.run_dir)])
    todo = [r for r in runs if not is_finished(r.run_dir)]
    for name in result.skipped:
        log(f"sweep: {name} finished earlier: skipped")
    devices = list(devices) if devices is not None else local_devices()
    placed = assign_devices(len(todo), devices)
    queues = {d: [r for r, p in zip(todo, placed) if p == d] for d in dict.fromkeys(placed)}

    def work(device: str) -> list[str]:
        out = []
        for run in queues[device]:
            row = execute(config, run, device, log)
            if isinstance(row, str):
                log(f"sweep: {row}")
                out.append(row)
        return out

    with ThreadPoolExecutor(max_workers=max(1, len(queues))) as pool:
        for failures in pool.map(work, list(queues)):
            result.failed += failures
    result.rows = [json.loads((r.run_dir / RESULT).read_text(encoding="utf-8")) for r in runs
                   if is_finished(r.run_dir)]
    if result.rows:
        write_results(sweep_dir, axes, result.rows)
    return result
