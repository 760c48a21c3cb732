"""Progress when stdout is not a terminal (CI logs, ``make train | tee``): plain lines to the run's log on logged
steps, at most one per ~10 s (the first and the last step always), with loss, lr, tokens/s and an ETA; the rich
bar (and no plain line) on a terminal."""

from __future__ import annotations

import re
import sys

import pytest
import torch

import slimtune
from slimtune.train.loop import LoopConfig, train_loop
from slimtune.train.metrics import PlainProgress, format_duration
from slimtune.train.sampler import EpochSampler
from slimtune.train.schedule import make_scheduler
from tests.conftest import tiny_llama

DATA = torch.randint(0, 128, (8, 12), generator=torch.Generator().manual_seed(3))
LINE = re.compile(r"^step (\d+)/(\d+)  loss \d+\.\d{3}  lr \d\.\de[-+]\d\d  \d+ tok/s  eta [0-9hms]+$")


def _run(tmp_path, steps: int, log_every: int = 1) -> list[str]:
    model = tiny_llama()
    slimtune.inject(model, slimtune.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    lines: list[str] = []
    train_loop(model, opt, make_scheduler(opt, steps, 0, "constant"), EpochSampler(8, 2, seed=0),
               lambda idx: {"input_ids": DATA[idx], "labels": DATA[idx]},
               LoopConfig(max_steps=steps, log_every=log_every), tmp_path, echo=lines.append)
    return lines


def test_off_a_terminal_plain_lines_go_to_echo_first_and_last_step_within_ten_seconds(tmp_path, capsys):
    assert not sys.stdout.isatty()  # pytest's captured stdout is not a terminal
    lines = _run(tmp_path, steps=4, log_every=2)
    assert [LINE.match(x).groups() for x in lines] == [("2", "4"), ("4", "4")]  # logged steps only, throttled
    assert lines[-1].endswith("eta 0s")
    assert capsys.readouterr().out == ""  # nothing else on stdout


def test_on_a_terminal_the_bar_shows_and_no_plain_line_is_echoed(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert _run(tmp_path, steps=2) == []
    assert "2/2" in capsys.readouterr().out


def test_plain_lines_come_at_most_every_ten_seconds_with_an_eta_from_seconds_per_step():
    now = [0.0]
    lines: list[str] = []
    progress = PlainProgress(total=30, start=0, echo=lines.append, clock=lambda: now[0])
    for step in range(1, 31):
        now[0] = 3.0 * step  # 3 s a step
        progress({"step": step, "loss": 0.2791, "lr": 7.3e-4, "tokens_per_s": 186.2} if step % 2 == 0 else None)
    steps = [int(LINE.match(x).group(1)) for x in lines]
    assert steps == [2, 6, 10, 14, 18, 22, 26, 30]  # logged (even) steps, >= 10 s apart, and the last
    assert lines[0] == "step 2/30  loss 0.279  lr 7.3e-04  186 tok/s  eta 1m24s"  # 3 s x 28 steps left


def test_a_resumed_run_estimates_from_its_own_steps():
    lines: list[str] = []
    now = [100.0]
    progress = PlainProgress(total=20, start=10, echo=lines.append, clock=lambda: now[0])
    now[0] = 110.0  # 2 steps in 10 s: 5 s a step, 8 left
    progress({"step": 12, "loss": 1.0, "lr": 1e-3, "tokens_per_s": 10.0})
    assert lines == ["step 12/20  loss 1.000  lr 1.0e-03  10 tok/s  eta 40s"]


@pytest.mark.parametrize("seconds, text", [(0.4, "0s"), (45, "45s"), (200, "3m20s"), (3720, "1h02m")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


@pytest.mark.slow
def test_slimtune_train_prints_plain_progress_lines_when_piped(tmp_path):
    import json

    from typer.testing import CliRunner

    from slimtune.cli import app

    rows = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                          {"role": "assistant", "content": str(a + b)}]} for a in range(2, 9) for b in range(3, 7)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = CliRunner().invoke(app, ["train", f"data.train={data}", "data.format=chat", "data.eval_fraction=0.25",
                                      "data.max_length=64", "train.max_steps=3", "train.batch_size=4",
                                      "train.eval_every=null", f"output_dir={tmp_path / 'run'}"])
    assert result.exit_code == 0, result.output
    steps = [LINE.match(x).groups() for x in result.output.splitlines() if LINE.match(x)]
    assert steps and steps[0] == ("1", "3") and steps[-1] == ("3", "3"), result.output
