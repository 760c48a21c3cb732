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


@pytest.mark.slow
def test_inspect_prints_the_report_for_the_real_model():
    result = runner.invoke(app, ["inspect", "--targets", "q_proj,v_proj", "--rank", "8"])
    assert result.exit_code == 0, result.output
    assert "wrapped 60 modules" in result.output and "trainable params: 460,800" in result.output
