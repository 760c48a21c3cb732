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


def test_every_example_config_loads():
    from pathlib import Path

    from slimtune.config import load_config

    methods = {load_config(p).method for p in Path("configs").glob("*.yaml")}
    assert methods == {"lora", "bottleneck", "prompt", "freeze", "full"}  # dora is lora with use_dora
    assert load_config("configs/dora.yaml").use_dora


def test_bad_config_file_names_the_file_and_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: lora\nr: 0\n")
    result = runner.invoke(app, ["demo", "--config", str(bad)])
    assert result.exit_code != 0 and "lora.r=0" in str(result.exception)


@pytest.mark.slow
def test_demo_runs_dora_from_a_config_file(tmp_path):
    result = runner.invoke(app, ["demo", "--config", "configs/dora.yaml", "--steps", "2", "--quick", "--batch", "2",
                                 "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "slimtune dora adapter 'default': wrapped 210 modules" in result.output
    assert "reloaded onto a fresh base: max logit diff" in result.output
