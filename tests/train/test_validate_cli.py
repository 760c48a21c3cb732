"""`slimtune validate CONFIG.yaml [key.path=value ...]`: "CONFIG: valid" and a summary, or every issue and exit 2."""

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from slimtune.cli import app

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def refused(args):
    """Run validate, check it exited 2 cleanly, and return its non-empty output lines."""
    result = runner.invoke(app, ["validate", *map(str, args)])
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    return [line for line in result.output.splitlines() if line.strip()]


@pytest.mark.parametrize("name", ["lora", "qlora", "prompt", "full", "alpaca", "chat", "text", "classification"])
def test_shipped_configs_are_valid_with_a_summary(name, monkeypatch):
    monkeypatch.chdir(ROOT)
    result = runner.invoke(app, ["validate", f"configs/train/{name}.yaml"])
    assert result.exit_code == 0, result.output
    first, summary = result.output.strip().split("\n", 1)
    assert first == f"configs/train/{name}.yaml: valid"
    assert "smollm2-135m" in summary and "effective batch 8 (batch_size 8 x grad_accum 1)" in summary
    assert ("nf4 4-bit base" in summary) == (name == "qlora")
    assert "\n" not in summary.strip()  # one paragraph


def test_summary_follows_overrides(monkeypatch):
    monkeypatch.chdir(ROOT)
    result = runner.invoke(app, ["validate", "configs/train/lora.yaml", "train.grad_accum=4", "adapter.r=16",
                                 "train.max_steps=12", "data.train=configs/train/data/chat.jsonl"])
    assert result.exit_code == 0, result.output
    for needle in ("lora r=16", "12 steps", "effective batch 32 (batch_size 8 x grad_accum 4)",
                   "Data: configs/train/data/chat.jsonl, chat format"):
        assert needle in result.output, (needle, result.output)


def test_four_errors_are_four_lines_each_naming_the_file(tmp_path):
    path = write(tmp_path, "trian: {}\ntrain: {lr: -1, batch_size: 0}\ndata: {format: xml}\n")
    lines = refused([path])
    assert lines == [f"error: {path}: trian: unknown section; did you mean train?",
                     f"error: {path}: data.format='xml': must be one of alpaca, chat, text, classification, images",
                     f"error: {path}: train.lr=-1: must be a positive number",
                     f"error: {path}: train.batch_size=0: must be a positive integer or auto"]


# one YAML per kind of issue: the line the CLI prints (after "error: FILE: ")
CASES = [
    ("trian: {}", "trian: unknown section; did you mean train?"),
    ("train: {lrr: 1}", "train.lrr: unknown field; did you mean train.lr?"),
    ("train: 5", "train=5: must be a mapping of field names to values"),
    ("train: {lr: -1}", "train.lr=-1: must be a positive number"),
    ("train: {batch_size: 2.5}", "train.batch_size=2.5: must be a positive integer"),
    ("train: {scheduler: step}", "train.scheduler='step': must be one of cosine, linear, constant"),
    ("data: {packing: maybe}", "data.packing='maybe': must be true or false"),
    ("data: {text_field: ''}", "data.text_field='': must be a non-empty string"),
    ("data: {train: rows.xml}", "data.train='rows.xml': must be a .json, .jsonl, .csv, .parquet or .txt file path"),
    ("data: {eval_fraction: 1.5}", "data.eval_fraction=1.5: must be a number in [0, 1)"),
    ("train: {warmup: 2.5}", "train.warmup=2.5: must be a fraction of the steps in [0, 1) or a whole number"),
    ("train: {max_steps: 10, epochs: 1}", "train.epochs=1.0: cannot be set with train.max_steps=10; set exactly one"),
    ("train: {max_steps: 10, warmup: 20}", "train.warmup=20: must be fewer steps than train.max_steps=10"),
    ("data: {eval: e.jsonl, eval_fraction: 0.1}", "data.eval_fraction=0.1: must be 0 when data.eval is set"),
    ("data: {train: t.txt, format: alpaca}", "data.train='t.txt': a .txt file holds raw text"),
    ("data: {format: classification}", "data.packing=True: classification rows are not packed"),
    ("quantize: int4", "quantize='int4': must be one of none, nf4"),
    ("output_dir: ''", "output_dir='': must be a non-empty string"),
    ("adapter: {r: 0}", "adapter.r=0: must be a positive integer"),
    ("adapter: {lora_alpha: 4}", "adapter.lora_alpha: unknown field; did you mean adapter.alpha?"),
    ("adapter: {method: lora2}", "adapter.method='lora2': must be one of lora, dora, bottleneck, prompt"),
    ("adapter: {method: qlora}", "adapter.method='qlora': QLoRA is LoRA on a 4-bit base"),
    ("adapter: [1]", "adapter=[1]: must be a mapping with a method"),
    ("quantize: nf4\nadapter: {method: full}", "quantize='nf4': cannot be used with adapter.method='full'"),
    ("adapter: {method: prompt}", "data.packing=True: prompt tuning prepends its virtual tokens"),
    ("adapter: {method: freeze}\ntrain: {loraplus_ratio: 16}", "train.loraplus_ratio=16.0: LoRA+ needs adapter"),
    ("model: {name: no/such/folder}", "model.name='no/such/folder': must be the bundled smollm2-135m"),
    ("data: {train: no_such.jsonl}", "data.train='no_such.jsonl': no such file"),
    ("train: {lr: [1\n", "not valid YAML: line 3, column 1"),
    ("- 1\n", "must be a mapping of sections"),
]


@pytest.mark.parametrize("text, line", CASES, ids=[c[1][:40] for c in CASES])
def test_each_issue_kind_is_one_line(tmp_path, monkeypatch, text, line):
    monkeypatch.chdir(tmp_path)
    for name in ("e.jsonl", "t.txt"):  # data files that exist, so only the rule under test fails
        (tmp_path / name).write_text("")
    path = write(tmp_path, text + "\n")
    lines = refused([path])
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: {line}"), lines


@pytest.mark.parametrize("override, line", [
    ("trainlr", "override 'trainlr': must look like key.path=value (e.g. train.lr=1e-4)"),
    ("=1", "override '=1': must look like key.path=value"),
    ("train.lr=[1", "override 'train.lr=[1': the value is not valid YAML"),
    ("train.lrr=1", "train.lrr: unknown field; did you mean train.lr?"),
    ("trian.lr=1", "trian: unknown section; did you mean train?"),
    ("output_dir.x=1", "output_dir.x: output_dir is a single value, not a section"),
    ("train.lr=-1", "train.lr=-1: must be a positive number"),
])
def test_bad_override_is_one_line_naming_it(tmp_path, override, line):
    path = write(tmp_path, "output_dir: out\n")
    lines = refused([path, override])
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: {line}"), lines


def test_missing_config_file_is_named(tmp_path):
    assert refused([tmp_path / "nope.yaml"]) == [f"error: {tmp_path / 'nope.yaml'}: no such config file"]


def test_validate_in_a_real_process_exits_2_with_lines_on_stderr_and_imports_no_torch(tmp_path):
    path = write(tmp_path, "train: {lr: -1, keep_last: 0}\n")
    code = ("import sys; from slimtune.cli import app\n"
            "try:\n    app()\nfinally:\n    assert 'torch' not in sys.modules, 'torch imported'\n")
    proc = subprocess.run([sys.executable, "-c", code, "validate", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert proc.stderr.splitlines() == [f"error: {path}: train.lr=-1: must be a positive number",
                                        f"error: {path}: train.keep_last=0: must be a positive integer"]


def test_other_commands_still_print_one_error_line():
    """The per-issue printing is only for errors that list issues: a ValueError stays one line."""
    from slimtune.cli_errors import error_lines
    from slimtune.train.config import RunConfigError

    assert error_lines(ValueError("a\nb")) == ["error: a b"]
    assert error_lines(RunConfigError(["a", "b"], source="f.yaml")) == ["error: f.yaml: a", "error: f.yaml: b"]
