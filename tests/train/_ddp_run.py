"""A tiny training run through train_loop on one process or, under torchrun, several (the distributed tests).

    python -m tests.train._ddp_run RUN_DIR [--steps 8] [--grad-accum 1] [--save-every 4] [--dropout 0] [--fsdp] [--nf4]
        [--nan-row I] [--step-sleep S]
    python -m torch.distributed.run --standalone --nproc_per_node 2 -m tests.train._ddp_run RUN_DIR ...

Tiny Llama + LoRA on fixed token rows whose batches depend only on their indices (no RNG: the same global batch
makes the same micro-batches whatever the number of processes), with a different number of masked labels per
row, so the ranks of a step hold different trained-token counts. Resumes from ``latest_checkpoint(RUN_DIR)``;
every rank prints ``pid N`` first (a test kills the workers, which torchrun starts in their own sessions),
rank 0 prints ``step N`` per step; every rank writes its final trainable tensors to
``RUN_DIR/final.rank<r>.safetensors``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

import slimtune
from slimtune.train.checkpoint import latest_checkpoint, load_checkpoint
from slimtune.train.distributed import process_group, seed_ranks, shard_base, world_from_env, wrap_ddp
from slimtune.train.loop import LoopConfig, train_loop
from slimtune.train.sampler import EpochSampler
from slimtune.train.schedule import make_scheduler
from tests.conftest import tiny_llama

ROWS, SEQ, BATCH = 24, 12, 2
DATA = torch.randint(0, 128, (ROWS, SEQ), generator=torch.Generator().manual_seed(1))


NAN_ROW: int | None = None  # --nan-row: the micro-batch holding this row feeds NaN embeddings (NaN loss there)


def make_batch(indices: list[int]) -> dict[str, torch.Tensor]:
    """Rows ``indices`` (B, SEQ); row i has its first ``i * 5 % 9`` labels masked (-100)."""
    ids = DATA[indices]
    labels = ids.clone()
    for row, i in enumerate(indices):
        labels[row, :i * 5 % 9] = -100
    if NAN_ROW in indices:
        return {"inputs_embeds": torch.full((len(indices), SEQ, 64), float("nan")), "labels": labels,
                "attention_mask": torch.ones_like(ids)}
    return {"input_ids": ids, "labels": labels}


def say(text: str) -> None:
    """One line in one write: the ranks share a pipe, and print() writes the text and its newline separately."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def run(run_dir: Path, steps: int, grad_accum: int, save_every: int, dropout: float, fsdp: bool,
        nf4: bool = False, step_sleep: float = 0.0) -> None:
    world = world_from_env()
    say(f"pid {os.getpid()}")
    with process_group(world):
        model = tiny_llama()
        if nf4:  # QLoRA: the frozen base in 4 bits (uint8 packed weights: what FSDP2 shards then)
            slimtune.quantize_model(model, compute_dtype=torch.float32)
        slimtune.inject(model, slimtune.LoraConfig(r=4, alpha=8, dropout=dropout, target_modules="all-linear"))
        torch.manual_seed(0)
        with torch.no_grad():  # B != 0 from the start, so every LoRA tensor gets a gradient at step 1
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.05)
        if fsdp:
            shard_base(model, world)
            frozen = [p for p in model.parameters() if not p.requires_grad]
            here = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in frozen)
            say(f"frozen values on this rank: {here} of {sum(p.numel() for p in frozen)}")
        net = wrap_ddp(model, world)
        seed_ranks(0, world)  # as slimtune train: each rank its own dropout stream
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                                      weight_decay=0.01)
        scheduler = make_scheduler(optimizer, total=steps, warmup=2, kind="cosine")
        sampler = EpochSampler(ROWS, BATCH, seed=3)
        start = 0
        ckpt = latest_checkpoint(run_dir)
        if ckpt is not None:
            start = load_checkpoint(ckpt, model=model, adapter_name="default", optimizer=optimizer,
                                    scheduler=scheduler, sampler=sampler, world=world)["step"]
        cfg = LoopConfig(max_steps=steps, grad_accum=grad_accum, max_grad_norm=1.0, precision="fp32", log_every=1,
                         save_every=save_every, keep_last=2)
        train_loop(model, optimizer, scheduler, sampler, make_batch, cfg, run_dir, start_step=start,
                   log=lambda r: report(r["step"], step_sleep), world=world, net=net)
        from safetensors.torch import save_file

        save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad},
                  str(run_dir / f"final.rank{world.rank}.safetensors"))


def report(step: int, sleep: float) -> None:
    """Rank 0's ``step N`` line, then a pause (``--step-sleep``: a test's SIGKILL lands well before the end;
    the other rank waits in the next step's all_reduce)."""
    say(f"step {step}")
    time.sleep(sleep)


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--save-every", type=int, default=4)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--fsdp", action="store_true")
    ap.add_argument("--nf4", action="store_true")
    ap.add_argument("--nan-row", type=int, default=None)
    ap.add_argument("--step-sleep", type=float, default=0.0)
    args = ap.parse_args(argv)
    global NAN_ROW
    NAN_ROW = args.nan_row
    torch.set_num_threads(1)
    run(args.run_dir, args.steps, args.grad_accum, args.save_every, args.dropout, args.fsdp, args.nf4,
        args.step_sleep)


if __name__ == "__main__":
    main(sys.argv[1:])
