"""`slimtune sweep` end to end on a tiny model: every run trained, the table written, a killed sweep resumed."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from typer.testing import CliRunner

from slimtune.cli import app

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def sweep_args(config: Path) -> list[str]:
    return [sys.executable, "-m", "slimtune", "sweep", str(config), "--grid", "adapter.r=2,4", "--budget-steps", "3"]


def wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 240.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        assert proc.poll() is None, f"the sweep ended (exit {proc.returncode}) before {what}"
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_killed_sweep_skips_finished_runs_and_resumes_the_interrupted_one(sweep_config, tmp_path):
    sweep = tmp_path / "out" / "sweep"
    first, second = sweep / "001-r=2", sweep / "002-r=4"
    proc = subprocess.Popen(sweep_args(sweep_config), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # its own process group: the kill takes the run with it
    try:
        wait_for(lambda: (second / "checkpoints" / "step-1" / "complete").is_file(), proc, "run 2's first checkpoint")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert (first / "result.json").is_file() and not (second / "result.json").exists()
    assert not (sweep / "results.md").exists()
    done_before = (first / "result.json").stat().st_mtime_ns

    again = subprocess.run(sweep_args(sweep_config), env=ENV, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "sweep: 001-r=2 finished earlier: skipped" in again.stdout
    assert "sweep: 002-r=4 on cpu (resuming)" in again.stdout
    assert (first / "result.json").stat().st_mtime_ns == done_before  # not run again
    assert "resumed from" in (second / "train.log").read_text()
    steps = [json.loads(line)["step"] for line in (second / "metrics.jsonl").read_text().splitlines()
             if "step" in json.loads(line)]
    assert steps == [1, 2, 3]  # each step once: the resume continued after the checkpoint

    table = list(csv.DictReader((sweep / "results.csv").open()))
    assert [(t["run"], t["adapter.r"]) for t in table] == [("001-r=2", "2"), ("002-r=4", "4")]
    assert sum(t["best"] == "1" for t in table) == 1
    for t in table:
        assert float(t["eval_loss"]) > 0 and float(t["tokens_per_s"]) > 0 and float(t["wall_s"]) > 0
        # the process holds the step's tensors and more (Python, torch, the tokenizer)
        assert float(t["measured_peak_mib"]) > float(t["est_peak_mib"]) > 0
    # r=4 trains twice r=2's parameters: r * (d_in + d_out) per layer
    assert int(table[1]["trainable_params"]) == 2 * int(table[0]["trainable_params"])
    assert "**best**" in (sweep / "results.md").read_text()
    assert (sweep / "results.png").read_bytes()[:4] == b"\x89PNG"


def test_an_invalid_combination_is_named_before_any_run(sweep_config, tmp_path):
    result = CliRunner().invoke(app, ["sweep", str(sweep_config), "--grid", "adapter.r=4,0", "train.lr=1e-3,-1"])
    assert result.exit_code == 2
    assert "error: run 002-r=4-lr=-1: train.lr=-1: must be a positive number" in result.output
    assert "error: run 003-r=0-lr=1e-3: adapter.r=0" in result.output
    assert not (tmp_path / "out").exists()


def test_a_bad_axis_exits_2_naming_it(sweep_config):
    result = CliRunner().invoke(app, ["sweep", str(sweep_config), "--grid", "adapter.r"])
    assert result.exit_code == 2 and "error: --grid 'adapter.r': must be key.path=value1,value2" in result.output
