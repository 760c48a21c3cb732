"""`report`: one self-contained HTML file (inlined PNGs, nothing fetched) for an adapter or a run folder."""

import base64
import json
import re

import pytest

from slimtune.inspect.folders import OutputExistsError
from slimtune.inspect.report import ReportError, build_report, read_metrics
from tests.inspect.helpers import peft_adapter, slimtune_adapter


def images(page):
    found = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert all(base64.b64decode(b).startswith(b"\x89PNG") for b in found)
    return found


def self_contained(page):
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert not re.search(r'(src|href)="(?!data:)', page)  # every src/href is inline data
    return True


def test_adapter_report_holds_the_table_and_three_figures(tmp_path):
    folder = slimtune_adapter(tmp_path / "a")
    page = build_report(folder, tmp_path / "r.html").read_text()
    assert len(images(page)) == 3 and self_contained(page)
    assert page.count("<tr>") == 1 + 14 and "model.layers.0.mlp.gate_proj" in page
    assert "||dW||_F" in page and "LlamaForCausalLM, 14 layers" in page


def test_peft_adapter_report(tmp_path):
    page = build_report(peft_adapter(tmp_path / "p", target_modules=["q_proj"]), tmp_path / "r.html").read_text()
    assert len(images(page)) == 3 and page.count("<tr>") == 1 + 2


def test_run_folder_adds_loss_curves(tmp_path):
    run = tmp_path / "run"
    slimtune_adapter(run / "adapter")
    lines = [json.dumps({"step": s, "loss": 3.0 / s}) for s in range(1, 6)]
    lines += [json.dumps({"step": 5, "eval_loss": 1.0}), '{"step": 6, "lo']  # the last: killed mid-write
    (run / "metrics.jsonl").write_text("\n".join(lines))
    page = build_report(run, tmp_path / "r.html").read_text()
    assert len(images(page)) == 4 and "<h2>Training</h2>" in page and self_contained(page)
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4, 5, 5]


def test_full_fine_tune_run_gets_curves_and_a_note(tmp_path):
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    page = build_report(run, tmp_path / "r.html").read_text()
    assert len(images(page)) == 1 and "trained the model itself (model/): no adapter to analyse" in page


def test_bad_targets_are_named_and_nothing_is_written(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="neither an adapter folder .* nor a run folder"):
        build_report(tmp_path / "empty", tmp_path / "r.html")
    (tmp_path / "r.html").write_text("mine")
    with pytest.raises(OutputExistsError, match="already exists"):
        build_report(slimtune_adapter(tmp_path / "a"), tmp_path / "r.html")
    assert (tmp_path / "r.html").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "empty", "r.html"]
