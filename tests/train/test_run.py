"""`slimtune train` end to end: the CLI a user types, on the real SmolLM2 and real (tiny) data files.

The fast tests stop before the model loads (bad rows, a second run without --resume); the slow ones train a few
steps and check what a user gets: the output folder, metrics, scores before and after, an adapter that PEFT
loads with equal logits, and a --resume that finishes the same run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from slimtune.cli import app
from slimtune.train.config import load_run_config

runner = CliRunner()

CHAT = [
    {"messages": [{"role": "user", "content": f"What is {a} plus {b}? Answer with a number."},
                  {"role": "assistant", "content": str(a + b)}]}
    for a in range(2, 9) for b in range(3, 7)
]


def _chat_file(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _args(tmp_path: Path, data: Path, *extra: str) -> list[str]:
    return ["train", f"data.train={data}", "data.format=chat", "data.eval_fraction=0.25", "data.max_length=64",
            "train.max_steps=3", "train.batch_size=4", "train.save_every=2", "train.eval_every=null",
            f"output_dir={tmp_path / 'run'}", *extra]


def test_a_bad_row_stops_the_run_naming_file_row_and_field(tmp_path):
    rows = CHAT[:5] + [{"messages": [{"role": "robot", "content": "hi"}]}] + CHAT[5:]
    data = _chat_file(tmp_path / "chat.jsonl", rows)
    result = runner.invoke(app, _args(tmp_path, data))
    assert result.exit_code == 2, result.output
    assert "chat.jsonl row 6" in result.output and "role" in result.output and "robot" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before training


def test_a_bad_config_lists_every_problem_and_exits_2(tmp_path):
    result = runner.invoke(app, ["train", "train.lr=-1", "data.format=xml", f"output_dir={tmp_path}"])
    assert result.exit_code == 2
    assert "train.lr=-1" in result.output and "data.format='xml'" in result.output


def test_default_run_config_is_the_bbc_topic_task():
    cfg = load_run_config(None)
    assert cfg.data.train is None and cfg.data.format == "chat" and cfg.model.name == "smollm2-135m"
    assert cfg.adapter.method == "lora" and cfg.train.max_steps <= 60  # a few minutes on a 2-core CPU


@pytest.mark.slow
def test_train_resume_and_load_in_peft(tmp_path):
    data = _chat_file(tmp_path / "chat.jsonl", CHAT)
    first = runner.invoke(app, _args(tmp_path, data, "train.max_steps=2"))
    assert first.exit_code == 0, first.output
    run = tmp_path / "run"
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"step-2"}
    again = runner.invoke(app, _args(tmp_path, data))  # same output_dir, no --resume: refused, nothing touched
    assert again.exit_code == 2 and "--resume" in again.output

    resumed = runner.invoke(app, _args(tmp_path, data, "--resume"))
    assert resumed.exit_code == 0, resumed.output
    assert "resumed from" in resumed.output and "step 2" in resumed.output
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3]
    summary = lines[-1]
    assert summary["event"] == "summary" and set(summary["before"]) == set(summary["after"])
    assert {"eval_loss", "eval_exact_match", "general_text_loss"} <= set(summary["after"])
    assert (run / "config.yaml").is_file() and "max_steps: 3" in (run / "config.yaml").read_text()

    import peft

    import slimtune
    from slimtune.train.model import load_model

    ours = load_model("smollm2-135m", "float32")
    slimtune.load_adapter(ours, run / "adapter")
    theirs = peft.PeftModel.from_pretrained(load_model("smollm2-135m", "float32"), run / "adapter").eval()
    x = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, theirs(x).logits, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_freeze_writes_a_plain_model_folder_that_transformers_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    data = _chat_file(tmp_path / "chat.jsonl", CHAT)
    result = runner.invoke(app, _args(tmp_path, data, "train.max_steps=1", "train.save_every=null",
                                      "adapter={method: freeze, last_n_blocks: 1}"))
    assert result.exit_code == 0, result.output
    folder = tmp_path / "run" / "model"
    assert (folder / "config.json").is_file() and not (tmp_path / "run" / "adapter").exists()
    assert "AutoModelForCausalLM.from_pretrained" in result.output
    trained = AutoModelForCausalLM.from_pretrained(folder).eval()
    from slimtune.train.model import load_model

    base = load_model("smollm2-135m", "float32")
    last = len(base.model.layers) - 1
    changed = {n for n, p in trained.named_parameters() if not torch.equal(p, base.get_parameter(n))}
    assert changed and all(f"layers.{last}." in n for n in changed), sorted(changed)[:5]


def test_general_text_too_short_is_a_named_error_before_training(tmp_path):
    data = _chat_file(tmp_path / "chat.jsonl", CHAT)
    short = tmp_path / "short.txt"
    short.write_text("Too short to score.")
    result = runner.invoke(app, _args(tmp_path, data, f"data.general={short}"))
    assert result.exit_code == 2 and "data.general=" in result.output and "128 tokens" in result.output
    assert not (tmp_path / "run" / "checkpoints").exists()
