"""A real sweep on the bundled model: SmolLM2-135M + LoRA on BBC News topics, adapter.r x train.lr.

    .venv/bin/python benchmarks/sweep_bbc.py [--steps 10] [--out runs/sweep-bbc]

Writes a small train / eval split of the bundled BBC News chat rows (200 / 16 articles, so the greedy answers of
the held-out set stay quick), runs ``slimtune sweep`` over ``adapter.r=4,16`` x ``train.lr=3e-4,1e-3`` with
``--budget-steps``, and copies the sweep's results.md and results.png to benchmarks/results/sweep_bbc.*.
Run again after an interruption: finished runs are skipped.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "sweep-bbc")
    args = ap.parse_args()
    from slimtune.train.data.bundled import bbc_topic_rows

    args.out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 200), ("eval", 16)):
        rows = bbc_topic_rows(split)[:n]
        (args.out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = args.out / "run.yaml"
    config.write_text(
        f"data: {{train: {args.out / 'train.jsonl'}, eval: {args.out / 'eval.jsonl'}, format: chat, "
        f"max_length: 256}}\n"
        "train: {batch_size: 4, warmup: 1, eval_every: null, save_every: 5}\n"
        f"output_dir: {args.out}\n")
    cmd = [sys.executable, "-m", "slimtune", "sweep", str(config), "--grid", "adapter.r=4,16", "train.lr=3e-4,1e-3",
           "--budget-steps", str(args.steps)]
    subprocess.run(cmd, check=True)
    results = ROOT / "benchmarks" / "results"
    shutil.copy(args.out / "sweep" / "results.md", results / "sweep_bbc.md")
    shutil.copy(args.out / "sweep" / "results.png", results / "sweep_bbc.png")


if __name__ == "__main__":
    main()
