"""Exact resume after SIGKILL: a real ``kill -9`` of a training subprocess at several points (after some
steps, inside a checkpoint write, between the rename and the ``complete`` marker), resumed from
``latest_checkpoint`` until finished, ends with trainable tensors bit-identical to an uninterrupted run's,
and metrics.jsonl holding exactly one line per step."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slimtune.train.checkpoint import MARKER, SLEEP_ENV, latest_checkpoint
from tests.train._tiny_run import run as run_tiny

ROOT = Path(__file__).resolve().parents[2]
STEPS, SAVE_EVERY = 24, 4


def _env(sleep: float | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop(SLEEP_ENV, None)
    if sleep is not None:
        env[SLEEP_ENV] = str(sleep)
    return env


def _start(run_dir: Path, sleep: float | None = None, stdout=subprocess.DEVNULL) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tests.train._tiny_run", str(run_dir), "--steps", str(STEPS),
           "--save-every", str(SAVE_EVERY)]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(sleep), stdout=stdout, stderr=subprocess.PIPE, text=True)


def _kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill (rc {proc.returncode})"


def _wait_for(proc: subprocess.Popen, found, what: str, timeout: float = 60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        hit = found()
        if hit:
            return hit
        if proc.poll() is not None:
            pytest.fail(f"run exited (rc {proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.005)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


def _new_entries(ckpts: Path, before: set[str], temp: bool):
    if not ckpts.is_dir():
        return None
    for p in ckpts.iterdir():
        if p.name in before:
            continue
        if temp and ".tmp-" in p.name:
            return p
        if not temp and p.name.startswith("step-") and not (p / MARKER).exists():
            return p
    return None


def _kill_after_step(run: Path, step: int) -> None:
    """Resume a run and SIGKILL it right after it reports ``step``."""
    proc = _start(run, stdout=subprocess.PIPE)
    for line in proc.stdout:
        if line.strip() == f"step {step}":
            break
    _kill(proc)


def _kill_during_save(run: Path, in_temp: bool, sleep: float, delay: float, tries: int = 3) -> Path:
    """Resume a run with the save hook sleeping ``sleep`` s between files and SIGKILL it ``delay`` s after a
    new temp folder (``in_temp``) or a new unmarked step folder appears; returns that folder. Retried when a
    loaded machine let the save get past that stage before the kill."""
    ckpts = run / "checkpoints"
    for _ in range(tries):
        before = {p.name for p in ckpts.iterdir()} if ckpts.is_dir() else set()
        proc = _start(run, sleep=sleep)
        hit = _wait_for(proc, lambda: _new_entries(ckpts, before, temp=in_temp), "the save stage")
        time.sleep(delay)
        _kill(proc)
        if hit.exists() and (in_temp or not (hit / MARKER).exists()):
            return hit
    pytest.fail(f"{tries} kills all came too late for the {'temp' if in_temp else 'unmarked'} stage")


def _finish(run_dir: Path, tries: int = 3) -> None:
    for _ in range(tries):
        proc = _start(run_dir)
        _, err = proc.communicate(timeout=120)
        if proc.returncode == 0:
            return
    pytest.fail(f"resumed run failed (rc {proc.returncode}): {err[-3000:]}")


def test_kill9_at_several_points_then_resume_is_bit_identical(tmp_path):
    rng = random.Random()
    seed = rng.randrange(10**6)
    rng.seed(seed)  # printed on failure through the assertion messages below
    ref = tmp_path / "ref"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses: the same kernels make the same sums
    try:
        run_tiny(ref, STEPS, SAVE_EVERY)  # the uninterrupted run, in this process (saves a start-up)
    finally:
        torch.set_num_threads(threads)
    run = tmp_path / "run"
    ckpts = run / "checkpoints"

    # 1. after a random number of steps
    kill_at = [rng.randrange(2, 11)]
    _kill_after_step(run, kill_at[0])

    # 2. inside a checkpoint write: a temp folder exists, files are being written into it
    temp = _kill_during_save(run, in_temp=True, sleep=0.1, delay=rng.uniform(0.0, 0.5))
    latest = latest_checkpoint(run)
    assert latest is None or ".tmp-" not in latest.name, f"seed {seed}: a temp folder was picked up"

    # 3. between the rename and the 'complete' marker: step-N exists but is not complete
    half = _kill_during_save(run, in_temp=False, sleep=0.2, delay=0.0)
    assert latest_checkpoint(run) != half, f"seed {seed}: {half.name} has no marker but was picked up"

    # 4. after a random step again, somewhere past the last complete checkpoint
    latest = latest_checkpoint(run)
    done = 0 if latest is None else int(latest.name.split("-")[1])
    kill_at.append(rng.randrange(done + 1, STEPS))
    _kill_after_step(run, kill_at[1])

    _finish(run)
    assert not temp.exists() and not any(".tmp-" in p.name for p in ckpts.iterdir()), "leftovers not removed"
    want, got = load_file(str(ref / "final.safetensors")), load_file(str(run / "final.safetensors"))
    assert sorted(want) == sorted(got)
    changed = [n for n in want if not torch.equal(want[n], got[n])]
    assert not changed, f"seed {seed} (killed at step {kill_at}): {changed[:3]} differ from the uninterrupted run"
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1)), f"seed {seed}: metrics steps {steps}"
    assert sorted(p.name for p in ckpts.iterdir()) == [f"step-{STEPS - SAVE_EVERY}", f"step-{STEPS}"]
