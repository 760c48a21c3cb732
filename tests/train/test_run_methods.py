"""`slimtune train` with the shipped method configs on the real SmolLM2-135M: what the old `slimtune demo` showed.

QLoRA (configs/train/qlora.yaml): the base is quantized to NF4, an adapter trains on top, the loss falls, and the
saved adapter loaded onto a freshly quantized base gives the trained model's logits. DoRA (configs/train/dora.yaml):
the run trains DoRA, not LoRA, and says so. Each run is a few steps on a tiny chat file (slow: tens of seconds).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import slimtune
from slimtune.cli import app

pytestmark = pytest.mark.slow
runner = CliRunner()

ROWS = [
    {"messages": [{"role": "user", "content": f"What is {a} plus {b}? Answer with a number."},
                  {"role": "assistant", "content": str(a + b)}]}
    for a in range(2, 4) for b in range(3, 7)
]
GENERAL = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings. " * 6
# (> 128 tokens: one block for the forgetting check; a shorter data.general is refused)


def run_args(tmp_path: Path, config: str, *extra: str) -> list[str]:
    """`slimtune train CONFIG` shrunk to seconds: 8 chat rows (2 held out), short rows, a one-block general text."""
    data, general = tmp_path / "chat.jsonl", tmp_path / "general.txt"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    general.write_text(GENERAL)
    return ["train", config, f"data.train={data}", "data.eval_fraction=0.25", f"data.general={general}",
            "data.max_length=96", "train.batch_size=2", "train.save_every=null", "train.eval_every=null",
            f"output_dir={tmp_path / 'run'}", *extra]


class Spy:
    """Wraps slimtune.save_adapter to keep the model the run saved (its in-memory trained state)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.model, self.real = None, slimtune.save_adapter
        monkeypatch.setattr(slimtune, "save_adapter", self)

    def __call__(self, model, *args, **kwargs):
        self.model = model
        return self.real(model, *args, **kwargs)


def summary(tmp_path: Path) -> dict:
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1])


def test_qlora_config_trains_on_an_nf4_base_and_reloads_onto_a_freshly_quantized_one(tmp_path, monkeypatch):
    spy = Spy(monkeypatch)
    result = runner.invoke(app, run_args(tmp_path, "configs/train/qlora.yaml", "train.max_steps=3", "train.lr=2e-3"))
    assert result.exit_code == 0, result.output
    assert "nf4 4-bit base" in result.output  # the summary before the run
    assert "slimtune NF4: quantized 210 linear layers" in result.output and "4.127 bits/param" in result.output
    assert "trainable params: 2,442,240 / 136,957,248" in result.output  # r=8 all-linear, as LoRA on fp32
    scores = summary(tmp_path)
    assert scores["after"]["eval_loss"] < scores["before"]["eval_loss"] - 0.05, scores

    adapter = tmp_path / "run" / "adapter"
    assert 1e6 < sum(f.stat().st_size for f in adapter.iterdir()) < 20e6  # ~9.9 MB of fp32 LoRA factors
    from slimtune.train.model import load_model

    fresh = load_model("smollm2-135m", "float32")
    slimtune.quantize_model(fresh, compute_dtype=torch.float32)
    slimtune.load_adapter(fresh, adapter)
    trained = spy.model.eval()
    assert isinstance(fresh.model.layers[0].self_attn.q_proj.base_layer, slimtune.Linear4bit)
    x = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, trained(x).logits, rtol=0, atol=1e-4)


def test_dora_config_trains_dora_and_says_so(tmp_path):
    result = runner.invoke(app, run_args(tmp_path, "configs/train/dora.yaml", "train.max_steps=1",
                                           "train.batch_size=1"))
    assert result.exit_code == 0, result.output
    assert "with dora r=8 alpha=16" in result.output  # the summary before the run
    assert "slimtune dora adapter 'default': wrapped 210 modules" in result.output  # dora, not lora
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["use_dora"] is True and saved["peft_type"] == "LORA"  # PEFT's spelling of DoRA
    assert set(summary(tmp_path)["after"]) >= {"eval_loss", "eval_exact_match", "general_text_loss"}
