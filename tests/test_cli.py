"""The CLI is thin: check that commands are wired, validate input, and print what they promise."""

import re
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
    for command in ("demo", "inspect", "version"):
        assert command in out


def test_bad_option_is_named():
    result = runner.invoke(app, ["demo", "--rank", "0"])
    assert result.exit_code != 0 and "--rank" in result.output


def test_help_does_not_import_torch():
    code = "import sys; from slimtune.cli import app; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_qlora_with_a_method_that_trains_the_base_is_refused_before_loading():
    result = runner.invoke(app, ["demo", "--qlora", "--config", "configs/full.yaml"])
    assert result.exit_code == 2 and "--qlora" in result.output and "4-bit" in result.output


@pytest.mark.slow
def test_inspect_prints_the_report_for_the_real_model():
    result = runner.invoke(app, ["inspect", "--targets", "q_proj,v_proj", "--rank", "8"])
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
    ("method: lora\nr: [8\n", ("not valid YAML: line 3, column 1",)),
    ("method: lora\nr: 0\n", ("lora.r=0: must be a positive integer",)),
    ("method: dora\nr: 0\n", ("dora.r=0: must be a positive integer",)),
    ("method: lora2\n", ("method='lora2': must be one of lora, dora, bottleneck, prompt, freeze, full",)),
    ("method: qlora\n", ("method='qlora'", "method: lora", "--qlora")),
    ("method: lora\nrank_pattern: 5\n", ("lora.rank_pattern=5: must be a mapping",)),
    ("method: [lora]\n", ("method=['lora']: must be one of",)),
    ("- lora\n- r: 8\n", ("must be a mapping of field names to values",)),
    ("method: lora\n1: 2\nrank: 8\n", ("unknown field(s) [1, 'rank']",)),
])
def test_demo_bad_config_file_is_one_line_naming_file_and_field(tmp_path, text, needles):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    line = one_error_line(bad_input(["demo", "--config", bad], *needles))
    assert str(bad) in line


def test_demo_config_that_cannot_be_read_is_named(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"method: lora  # caf\xe9\n")
    one_error_line(bad_input(["demo", "--config", bad], str(bad), "cannot be read as UTF-8"))


def test_demo_missing_config_file_names_the_flag():
    bad_input(["demo", "--config", "no/such.yaml"], "--config", "does not exist")


def test_qlora_with_a_method_that_trains_the_base_is_refused_before_loading():
    line = one_error_line(bad_input(["demo", "--qlora", "--config", "configs/full.yaml"]))
    assert "--qlora with method full" in line and "4-bit" in line


@pytest.mark.parametrize("flag, value", [("--rank", "16"), ("--alpha", "32")])
def test_demo_rank_or_alpha_with_a_method_without_them_is_refused(flag, value):
    line = one_error_line(bad_input(["demo", flag, value, "--config", "configs/bottleneck.yaml"]))
    assert f"{flag}={float(value) if flag == '--alpha' else int(value)!r} with method bottleneck" in line


def test_demo_bad_alpha_names_the_flag():
    line = one_error_line(bad_input(["demo", "--alpha", "0"]))
    assert "--alpha=0.0" in line and "lora.alpha=0.0: must be a positive number" in line


def test_demo_out_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("")
    line = one_error_line(bad_input(["demo", "--out", tmp_path / "f"]))
    assert f"--out={str(tmp_path / 'f')!r}: is a file" in line


class Stop(Exception):
    pass


@pytest.mark.parametrize("path, rank, alpha, want", [
    ("configs/lora.yaml", "16", None, ("lora", 16, 16.0)),
    ("configs/dora.yaml", "4", "8", ("dora", 4, 8.0)),
    ("configs/lora.yaml", None, None, ("lora", 8, 16.0)),
])
def test_demo_rank_and_alpha_flags_win_over_a_lora_config(monkeypatch, path, rank, alpha, want):
    """--rank/--alpha with a lora/dora config are honoured (the flag wins), not silently dropped."""
    import slimtune.demo

    seen = []

    def capture(config, qlora):  # the config the demo would train, before any model loads
        seen.append(config)
        raise Stop

    monkeypatch.setattr(slimtune.demo, "check_qlora", capture)
    args = ["demo", "--config", path] + (["--rank", rank] if rank else []) + (["--alpha", alpha] if alpha else [])
    result = runner.invoke(app, args)
    assert isinstance(result.exception, Stop), result.output
    cfg = seen[0]
    assert (cfg.method, cfg.r, cfg.alpha) == want
    assert cfg.target_modules == "all-linear" and cfg.dropout == 0.05  # the rest comes from the file


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=64)
    return LlamaForCausalLM(cfg), None


def test_inspect_bad_targets_are_refused_before_the_model_loads(monkeypatch):
    import slimtune.assets

    monkeypatch.setattr(slimtune.assets, "load_smollm2", lambda: pytest.fail("loaded the model"))
    line = one_error_line(bad_input(["inspect", "--targets", "q_proj("]))
    assert "lora.target_modules='q_proj('" in line and "regular expression" in line
    assert "lora.alpha=0.0" in one_error_line(bad_input(["inspect", "--alpha", "0"]))


def test_inspect_targets_matching_nothing_name_the_field(monkeypatch):
    import slimtune.assets

    monkeypatch.setattr(slimtune.assets, "load_smollm2", tiny_llama)
    line = one_error_line(bad_input(["inspect", "--targets", "qproj,vproj"]))
    assert "lora.target_modules=('qproj', 'vproj') matches no adaptable module" in line


def test_bad_config_exits_2_in_a_real_process_with_one_line_on_stderr(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: lora\nr: 0\n")
    proc = subprocess.run([sys.executable, "-c", "from slimtune.cli import main; main()", "demo", "--config",
                           str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == f"error: {bad}: lora.r=0: must be a positive integer"


@pytest.mark.slow
def test_demo_runs_dora_from_a_config_file(tmp_path):
    result = runner.invoke(app, ["demo", "--config", "configs/dora.yaml", "--steps", "2", "--quick", "--batch", "2",
                                 "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "slimtune dora adapter 'default': wrapped 210 modules" in result.output
    assert re.search(r"full fine-tune [\d,.]+ MB -> dora [\d,.]+ MB", result.output)  # dora, not lora
    assert "reloaded onto a fresh base: max logit diff" in result.output
