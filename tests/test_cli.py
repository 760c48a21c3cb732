"""The CLI is thin: check that commands are wired, validate input, and print what they promise."""

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from slimtune.cli import app
from slimtune.version import __version__

runner = CliRunner()


def test_version_and_help():
    assert runner.invoke(app, ["version"]).output.strip() == __version__
    out = runner.invoke(app, ["--help"]).output
    for command in ("train", "validate", "targets", "inspect", "compress", "extract", "report", "version"):
        assert command in out
    assert "demo" not in {c.name or c.callback.__name__ for c in app.registered_commands}  # issue 11: train replaced it


def test_bad_option_is_named():
    result = runner.invoke(app, ["targets", "--rank", "0"])
    assert result.exit_code != 0 and "--rank" in result.output


def test_help_does_not_import_torch():
    code = "import sys; from slimtune.cli import app; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_targets_prints_the_report_for_the_real_model():
    result = runner.invoke(app, ["targets", "--targets", "q_proj,v_proj", "--rank", "8"])
    assert result.exit_code == 0, result.output
    assert "wrapped 60 modules" in result.output and "trainable params: 460,800" in result.output


def test_every_example_config_loads_under_its_canonical_method_name():
    from pathlib import Path

    from slimtune.config import load_config

    for path in Path("configs").glob("*.yaml"):
        assert load_config(path).method == path.stem  # configs/dora.yaml says dora, and is dora everywhere
    assert load_config("configs/dora.yaml").use_dora


# -- bad input: one "error:" line naming the flag or field, exit status 2, no traceback -----------------

def bad_input(args, *needles):
    """Run the CLI, check it refused the input cleanly, and return its output."""
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit)  # handled: no exception escaped the command
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output, result.output
    return result.output


def one_error_line(output):
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    return lines[0]


@pytest.mark.parametrize("text, needles", [
    ("adapter: {r: [8\n", ("not valid YAML: line 2, column 1",)),
    ("adapter: {method: lora, r: 0}\n", ("adapter.r=0: must be a positive integer",)),
    ("adapter: {method: dora, r: 0}\n", ("adapter.r=0: must be a positive integer",)),
    ("adapter: {method: qlora}\n", ("adapter.method='qlora'", "4-bit base")),
    ("adapter: {method: lora, rank: 8}\n", ("adapter.rank: unknown field",)),
    ("- lora\n", ("must be a mapping of sections",)),
])
def test_train_bad_config_file_is_one_line_naming_file_and_field(tmp_path, text, needles):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    line = one_error_line(bad_input(["train", bad, f"output_dir={tmp_path / 'run'}"], *needles))
    assert line.startswith(f"error: {bad}: ")
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_train_config_that_cannot_be_read_is_named(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"adapter: {method: lora}  # caf\xe9\n")
    one_error_line(bad_input(["train", bad], str(bad), "cannot be read as UTF-8"))


def test_train_missing_config_file_is_named(tmp_path):
    missing = tmp_path / "no.yaml"
    assert one_error_line(bad_input(["train", missing])) == f"error: {missing}: no such config file"


@pytest.mark.parametrize("method", ["full", "freeze"])
def test_nf4_with_a_method_that_trains_the_base_is_refused_before_loading(tmp_path, monkeypatch, method):
    """What `slimtune demo --qlora --config configs/full.yaml` refused: now quantize: nf4 with freeze/full."""
    import slimtune.train.run

    monkeypatch.setattr(slimtune.train.run, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    config = tmp_path / "qlora-full.yaml"
    config.write_text(f"quantize: nf4\nadapter: {{method: {method}}}\noutput_dir: {tmp_path / 'run'}\n")
    line = one_error_line(bad_input(["train", config]))
    assert f"quantize='nf4': cannot be used with adapter.method='{method}'" in line and "4 bits" in line
    assert not (tmp_path / "run").exists()


def test_train_override_a_method_does_not_have_is_refused(tmp_path):
    """--rank on a bottleneck config was refused by the demo; adapter.r=16 on one is refused by train."""
    out = bad_input(["train", "configs/train/bottleneck.yaml", "adapter.r=16", f"output_dir={tmp_path / 'run'}"])
    assert "error: configs/train/bottleneck.yaml: adapter.r: unknown field" in out


def test_train_output_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("")
    line = bad_input(["train", f"output_dir={tmp_path / 'f'}"]).splitlines()[-1]  # after the run's summary
    assert line.startswith(f"error: output_dir={str(tmp_path / 'f')!r}: is a file")
    assert (tmp_path / "f").read_text() == ""


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=64)
    return LlamaForCausalLM(cfg), None


def test_targets_bad_targets_are_refused_before_the_model_loads(monkeypatch):
    import slimtune.train.model

    monkeypatch.setattr(slimtune.train.model, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    line = one_error_line(bad_input(["targets", "--targets", "q_proj("]))
    assert "lora.target_modules='q_proj('" in line and "regular expression" in line
    assert "lora.alpha=0.0" in one_error_line(bad_input(["targets", "--alpha", "0"]))


def test_targets_matching_nothing_name_the_field(tmp_path):
    tiny_llama()[0].save_pretrained(tmp_path / "tiny")
    line = bad_input(["targets", tmp_path / "tiny", "--targets", "qproj,vproj"]).splitlines()[-1]  # after loading
    assert line.startswith("error: ") and "lora.target_modules=('qproj', 'vproj') matches no adaptable module" in line


def test_targets_on_a_model_folder_counts_what_lora_would_train(tmp_path):
    tiny_llama()[0].save_pretrained(tmp_path / "tiny")
    result = runner.invoke(app, ["targets", str(tmp_path / "tiny"), "--targets", "q_proj,v_proj", "--rank", "2"])
    assert result.exit_code == 0, result.output
    # 2 blocks x (q: 2 * (16 + 16) + v: 2 * (16 + 16)) = 256 LoRA parameters
    assert "wrapped 4 modules" in result.output and "trainable params: 256" in result.output


def test_targets_on_a_missing_model_names_it(tmp_path):
    line = one_error_line(bad_input(["targets", tmp_path / "nope"]))
    assert f"model.name={str(tmp_path / 'nope')!r}" in line


def test_bad_config_exits_2_in_a_real_process_with_one_line_on_stderr(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("adapter: {method: lora, r: 0}\n")
    proc = subprocess.run([sys.executable, "-c", "from slimtune.cli import main; main()", "train", str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == f"error: {bad}: adapter.r=0: must be a positive integer"
