"""One check for every image run: kill after a checkpoint, resume, get the same adapter and metrics."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

TIMING = ("elapsed_s", "tokens_per_s")  # wall-clock fields, the only ones a resumed run may change


def assert_resume_is_exact(cfg, out: Path, last_checkpoint: str = "step-6") -> None:
    """Train ``cfg`` (output_dir ``out``) whole; delete ``last_checkpoint``, the adapter and the last metrics line
    (as if killed after the previous checkpoint); resume: the adapter bit for bit and the metrics equal."""
    from slimtune.train.run import train

    train(cfg, log=lambda s: None)
    whole = load_file(str(out / "adapter" / "pytorch_lora_weights.safetensors"))
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(out / "checkpoints" / last_checkpoint)
    shutil.rmtree(out / "adapter")
    (out / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics[:-1]))
    train(cfg, resume=True, log=lambda s: None)
    resumed = load_file(str(out / "adapter" / "pytorch_lora_weights.safetensors"))
    assert resumed.keys() == whole.keys()
    for k in whole:
        assert torch.equal(resumed[k], whole[k]), k
    again = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in m.items() if k not in TIMING} for m in again[:-1]] == \
        [{k: v for k, v in m.items() if k not in TIMING} for m in metrics[:-1]]
