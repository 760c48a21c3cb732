"""The low-rank claim on real runs of SmolLM2-135M (issue 14): extract and compress, scored by eval loss.

1. Extract: from a full fine-tune made with `slimtune train` (method full) and its base, the rank-K LoRA of
   W_tuned - W0 at K = 4, 8, 16, 64 (plus K = 16 by randomized SVD): energy captured per module kind and overall,
   and the eval loss of base + extracted adapter against the base, the full fine-tune, and the base with every
   linear layer of the fine-tune (the most any all-linear adapter can reach).
2. Compress: a LoRA from `slimtune train`, compressed at rank 4 and at 95% energy: size, energy kept, eval loss.

Eval loss is the run's own held-out set (its config.yaml), token-weighted cross-entropy. Run it on a quiet machine:
    .venv/bin/python benchmarks/inspect_real.py FULL_RUN_DIR LORA_RUN_DIR
Writes benchmarks/results/inspect_real.md.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

import slimtune
from slimtune.inspect.compress import compress_adapter
from slimtune.inspect.extract import extract_lora, read_tensor, tensor_files
from slimtune.inspect.plots import layer_and_kind
from slimtune.train import evaluate as ev
from slimtune.train.config import load_run_config
from slimtune.train.datasets import build_run_data
from slimtune.train.model import load_model, load_tokenizer

RANKS = (4, 8, 16, 64)
OUT = Path(__file__).parent / "results" / "inspect_real.md"


def eval_batches(run_dir: Path):
    cfg = load_run_config(run_dir / "config.yaml")
    tokenizer = load_tokenizer(cfg.model.name)
    data = build_run_data(cfg.data, tokenizer, cfg.train.seed)
    return cfg.model.name, data.eval_batches(cfg.train.batch_size)


def loss_with_adapter(base: str, adapter: Path | None, batches) -> float:
    model = load_model(base, "float32")
    if adapter is not None:
        slimtune.load_adapter(model, adapter)
    return ev.eval_loss(model, batches)


def loss_linear_only(base: str, tuned: Path, names: list[str], batches) -> float:
    """The base with the weights of layers ``names`` taken from the fine-tune (embeddings, norms stay the base's)."""
    model = load_model(base, "float32")
    files = tensor_files(tuned, "tuned")
    with torch.no_grad():
        for n in names:
            model.get_submodule(n).weight.copy_(read_tensor(files, f"{n}.weight"))
    return ev.eval_loss(model, batches)


def energy_by_kind(result) -> dict[str, float]:
    num: dict[str, float] = {}
    den: dict[str, float] = {}
    for x in result.layers:
        kind = layer_and_kind(x.name)[1]
        num[kind] = num.get(kind, 0.0) + x.energy * x.norm ** 2
        den[kind] = den.get(kind, 0.0) + x.norm ** 2
    return {k: num[k] / den[k] for k in num}


def extract_part(full_run: Path, work: Path) -> list[str]:
    base, batches = eval_batches(full_run)
    tuned = full_run / "model"
    rows, kinds = [], None
    base_loss, full_loss = loss_with_adapter(base, None, batches), ev.eval_loss(load_model(str(tuned), "float32"),
                                                                                batches)
    for k, exact_below in [(k, 1024) for k in RANKS] + [(16, 256)]:
        t0 = time.perf_counter()
        result = extract_lora(base, tuned, k, work / f"k{k}-{exact_below}", exact_below=exact_below)
        seconds = time.perf_counter() - t0
        loss = loss_with_adapter(base, result.out, batches)
        if kinds is None:
            kinds = list(energy_by_kind(result))
            linear_loss = loss_linear_only(base, tuned, [x.name for x in result.layers], batches)
        by_kind = energy_by_kind(result)
        label = f"{k}" + (" (randomized SVD)" if exact_below == 256 else "")
        gain = (base_loss - loss) / (base_loss - full_loss)
        rows.append(f"| {label} | {result.energy:.2%} | " + " | ".join(f"{by_kind[c]:.1%}" for c in kinds)
                    + f" | {min(x.energy for x in result.layers):.1%} | {loss:.4f} | {gain:.1%} | {seconds:.0f} s |")
        uncaptured = result.uncaptured
    head = ["## Extract: rank-K LoRA of a full fine-tune (W_tuned - W0 on the 210 all-linear layers)", "",
            f"Full fine-tune: `{full_run}` (method full). Eval loss on its held-out set: base **{base_loss:.4f}**, "
            f"full fine-tune **{full_loss:.4f}**, base + every linear layer of the fine-tune (the ceiling of an "
            f"all-linear adapter) **{linear_loss:.4f}**.", "",
            "| K | energy captured | " + " | ".join(kinds) + " | least-captured layer | eval loss | share of the "
            "full fine-tune's loss drop | time |",
            "|---|---|" + "---|" * len(kinds) + "---|---|---|---|"]
    tail = ["", f"Changed outside the linear layers (not carried by any all-linear LoRA): {len(uncaptured)} tensors, "
            f"e.g. " + ", ".join(f"{k} (||dW||_F {v:.3g})" for k, v in sorted(uncaptured.items(),
                                                                           key=lambda kv: -kv[1])[:3]) + "."]
    return head + rows + tail


def compress_part(lora_run: Path, work: Path) -> list[str]:
    base, batches = eval_batches(lora_run)
    adapter = lora_run / "adapter"
    original = loss_with_adapter(base, adapter, batches)
    base_loss = loss_with_adapter(base, None, batches)
    rows = [f"| original | {adapter.joinpath('adapter_model.safetensors').stat().st_size:,} | 100% | 8 | "
            f"{original:.4f} |"]
    for name, how in (("rank 4", {"rank": 4}), ("rank 2", {"rank": 2}), ("energy 0.95", {"energy": 0.95}),
                      ("energy 0.90", {"energy": 0.90})):
        result = compress_adapter(adapter, work / name.replace(" ", "-"), **how)
        loss = loss_with_adapter(base, result.out, batches)
        ranks = sorted({m.r_after for m in result.modules})
        rows.append(f"| {name} | {result.bytes_after:,} | {result.energy_kept:.2%} | "
                    f"{ranks[0]}-{ranks[-1]} (mean {sum(m.r_after for m in result.modules) / len(result.modules):.1f})"
                    f" | {loss:.4f} |")
    return ["## Compress: a LoRA from `slimtune train` (r=8, all-linear)", "",
            f"Run: `{lora_run}`. Eval loss: base {base_loss:.4f}.", "",
            "| adapter | bytes | energy kept | ranks | eval loss |", "|---|---|---|---|---|", *rows]


def main(full_run: str, lora_run: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        lines = ["# inspect on real runs of SmolLM2-135M", "", "Made by `benchmarks/inspect_real.py` (CPU, fp32).", ""]
        lines += extract_part(Path(full_run), Path(tmp)) + [""]
        if lora_run != "-":
            lines += compress_part(Path(lora_run), Path(tmp))
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(*sys.argv[1:3])
