"""`slimtune train` in one process puts the model and its batches on the GPU when there is one (skips without)."""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_a_single_process_run_trains_on_the_gpu(tmp_path):
    from slimtune.train.config import load_run_config
    from slimtune.train.run import train

    lines: list[str] = []
    cfg = load_run_config(None, ["train.max_steps=2", "train.batch_size=2", "data.max_length=64",
                                 "train.eval_every=null", "train.save_every=1", f"output_dir={tmp_path / 'run'}"])
    result = train(cfg, log=lines.append)
    assert "device: cuda:0" in lines
    assert all(math.isfinite(v) for v in result.after.values() if isinstance(v, float))  # scored on the GPU
    assert (tmp_path / "run" / "checkpoints" / "step-2").is_dir()
