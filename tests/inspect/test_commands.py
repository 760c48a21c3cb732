"""The four commands end to end through the CLI, on tiny models and adapters saved by slimtune and PEFT."""

import json

import pytest
from typer.testing import CliRunner

from slimtune.cli import app
from tests.conftest import tiny_llama
from tests.inspect.helpers import peft_adapter, slimtune_adapter
from tests.inspect.test_extract import fine_tune

runner = CliRunner()


def ok(args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def refused(args, needle):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), (result.output, result.exception)
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: ") and needle in last, result.output
    return last


@pytest.mark.parametrize("make", [slimtune_adapter, peft_adapter])
def test_inspect_prints_a_table_and_json(tmp_path, make):
    folder = make(tmp_path / "a")
    text = ok(["inspect", folder])
    assert "method       lora" in text and "model.layers.0.mlp.gate_proj" in text
    data = json.loads(ok(["inspect", folder, "--json"]))
    assert len(data["modules"]) == 14 and data["trainable_params"] > 0


def test_compress_with_a_base_reports_size_and_logit_error(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "base")
    out = ok(["compress", slimtune_adapter(tmp_path / "a"), "--rank", "2", "-o", tmp_path / "c",
              "--base", tmp_path / "base"])
    assert "ranks      2 (was 4)" in out and "bytes" in out and "of the adapter's own effect" in out
    assert (tmp_path / "c" / "adapter_model.safetensors").is_file()


def test_extract_then_report_and_inspect_the_result(tmp_path):
    fine_tune(tmp_path / "base", tmp_path / "tuned", rank=2)
    out = ok(["extract", "--base", tmp_path / "base", "--tuned", tmp_path / "tuned", "--rank", "2",
              "-o", tmp_path / "lora"])
    assert "energy captured: 100.00%" in out
    assert "report written to" in ok(["report", tmp_path / "lora", "-o", tmp_path / "r.html"])
    assert (tmp_path / "r.html").read_text().count("data:image/png") == 3
    assert "ranks        2" in ok(["inspect", tmp_path / "lora"])


def test_bad_input_is_one_named_error_line(tmp_path):
    folder = slimtune_adapter(tmp_path / "a")
    refused(["inspect", tmp_path / "nope"], "is not a folder")
    refused(["compress", folder, "-o", tmp_path / "c"], "give exactly one (--rank K or --energy 0.95)")
    refused(["compress", folder, "--energy", "2", "-o", tmp_path / "c"], "energy=2.0: must be in (0, 1]")
    refused(["compress", folder, "--rank", "2", "-o", folder], "already exists")
    refused(["extract", "--base", tmp_path / "nope", "--tuned", folder, "--rank", "2", "-o", tmp_path / "x"],
            "not a Hugging Face model folder")
    refused(["report", tmp_path, "-o", tmp_path / "r.html"], "neither an adapter folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
