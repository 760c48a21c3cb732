"""A tiny, complete training run through train_loop, for the kill/resume test and the loop tests.

    python -m tests.train._tiny_run RUN_DIR [--steps 24] [--save-every 4]

Tiny Llama + LoRA (dropout 0.1, so the torch RNG matters) on synthetic token rows; each batch is a crop at a
``random`` offset with a ``numpy``-drawn number of labels masked, so Python's and NumPy's RNGs matter too.
Resumes from ``latest_checkpoint(RUN_DIR)`` when there is one; prints ``step N`` per step; writes the final
trainable tensors to ``RUN_DIR/final.safetensors``.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np
import torch

import slimtune
from slimtune.train.checkpoint import latest_checkpoint, load_checkpoint
from slimtune.train.loop import LoopConfig, train_loop
from slimtune.train.sampler import EpochSampler
from slimtune.train.schedule import make_scheduler
from tests.conftest import tiny_llama

ROWS, ROW_LEN, SEQ = 40, 20, 16


def build(steps: int, seed: int = 0, dropout: float = 0.1, batch_size: int = 4, lr: float = 1e-2):
    """(model, optimizer, scheduler, sampler, make_batch), all from ``seed``."""
    model = tiny_llama()  # seeds torch with 0 itself
    slimtune.inject(model, slimtune.LoraConfig(r=4, alpha=8, dropout=dropout, target_modules="all-linear"))
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    data = torch.randint(0, 128, (ROWS, ROW_LEN), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    scheduler = make_scheduler(optimizer, total=steps, warmup=3, kind="cosine")
    sampler = EpochSampler(ROWS, batch_size, seed)

    def make_batch(indices: list[int]) -> dict[str, torch.Tensor]:
        offset = random.randrange(ROW_LEN - SEQ + 1)
        ids = data[indices, offset:offset + SEQ]
        labels = ids.clone()
        labels[:, :int(np.random.randint(0, 4))] = -100
        return {"input_ids": ids, "labels": labels}

    return model, optimizer, scheduler, sampler, make_batch


def run(run_dir: Path, steps: int, save_every: int) -> dict:
    model, optimizer, scheduler, sampler, make_batch = build(steps)
    start = 0
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None:
        start = load_checkpoint(ckpt, model=model, adapter_name="default", optimizer=optimizer,
                                scheduler=scheduler, sampler=sampler)["step"]
    cfg = LoopConfig(max_steps=steps, grad_accum=1, max_grad_norm=1.0, precision="fp32", log_every=1,
                     eval_every=None, save_every=save_every, keep_last=2)
    result = train_loop(model, optimizer, scheduler, sampler, make_batch, cfg, run_dir, start_step=start,
                        log=lambda r: print(f"step {r['step']}", flush=True))
    from safetensors.torch import save_file

    save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad},
              str(run_dir / "final.safetensors"))
    return result


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--save-every", type=int, default=4)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    run(args.run_dir, args.steps, args.save_every)


if __name__ == "__main__":
    main(sys.argv[1:])
