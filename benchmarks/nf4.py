"""NF4 benchmarks and figures, slimtune vs bitsandbytes in the same run.

    python benchmarks/nf4.py              # throughput: dequantize, 4-bit linear forward+backward -> results/nf4.md
    python benchmarks/nf4.py --quality    # SmolLM2-135M: bits/param, perplexity, QLoRA vs LoRA, peak RSS
                                          #   -> results/nf4_quality.md

Throughput: each case alternates slimtune and bitsandbytes calls (paired runs) and reports the medians and
the median of the per-pair ratios bnb_time / slimtune_time (> 1: slimtune faster).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from _common import machine

RESULTS = Path(__file__).parent / "results"
# SmolLM2-135M: hidden 576, intermediate 1536, 3 KV heads of 64 -> k/v projections 576 -> 192
SHAPES = {"q_proj 576x576": (576, 576), "k_proj 192x576": (192, 576), "up_proj 1536x576": (1536, 576),
          "down_proj 576x1536": (576, 1536)}


def paired(f_ours, f_theirs, n: int) -> tuple[float, float, float]:
    """(median ours s, median theirs s, median of theirs/ours per pair), alternating which runs first."""
    for _ in range(3):
        f_ours(), f_theirs()
    ours, theirs, ratios = [], [], []
    for i in range(n):
        pair = []
        for f in ((f_ours, f_theirs) if i % 2 == 0 else (f_theirs, f_ours)):
            t = time.perf_counter()
            f()
            pair.append(time.perf_counter() - t)
        a, b = (pair[0], pair[1]) if i % 2 == 0 else (pair[1], pair[0])
        ours.append(a), theirs.append(b), ratios.append(b / a)
    return statistics.median(ours), statistics.median(theirs), statistics.median(ratios)


def throughput(n: int, tokens: int) -> list[str]:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bf

    from slimtune.quant import Linear4bit, dequantize_nf4, quantize_nf4

    rows = ["| case | dtype | slimtune (us) | bitsandbytes (us) | ratio bnb/slimtune |", "|---|---|---|---|---|"]
    for label, (out_f, in_f) in SHAPES.items():
        torch.manual_seed(0)
        w = torch.randn(out_f, in_f) * 0.02
        packed, state = quantize_nf4(w)
        q, s = bf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        for dt in (torch.float32, torch.bfloat16):
            s.dtype = dt  # bitsandbytes dequantizes to the state's dtype
            mo, mt, r = paired(lambda: dequantize_nf4(packed, state, dt), lambda: bf.dequantize_4bit(q, s), n)
            rows.append(f"| dequantize {label} | {str(dt)[6:]} | {mo * 1e6:.0f} | {mt * 1e6:.0f} | {r:.2f}x |")
        s.dtype = torch.float32
        lin = torch.nn.Linear(in_f, out_f, bias=False)
        lin.weight.data = w
        ours = Linear4bit.from_linear(lin)
        theirs = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.float32, quant_type="nf4",
                                   compress_statistics=True)
        theirs.load_state_dict(lin.state_dict())
        theirs = theirs.to("cpu")
        x = torch.randn(tokens, in_f, requires_grad=True)

        def step(layer):
            x.grad = None
            layer(x).sum().backward()

        mo, mt, r = paired(lambda: step(ours), lambda: step(theirs), n)
        rows.append(f"| linear fwd+bwd {label}, {tokens} tokens | float32 | {mo * 1e6:.0f} | {mt * 1e6:.0f} | {r:.2f}x |")
    return rows


# -- quality and memory on the real model --------------------------------------------------------------

def perplexity(model, blocks: torch.Tensor) -> float:
    with torch.no_grad():
        losses = [model(b[None], labels=b[None]).loss.item() for b in blocks]
    return math.exp(sum(losses) / len(losses))


def finetune_drop(quantized: bool, train: torch.Tensor, held: torch.Tensor, steps: int, lr: float) -> tuple[float, float]:
    """(held-out loss before, after) ``steps`` LoRA steps on ``train`` with an fp32 or NF4 base."""
    import slimtune
    from slimtune.assets import load_smollm2
    from slimtune.quant import quantize_model

    torch.manual_seed(0)
    model, _ = load_smollm2()
    if quantized:
        quantize_model(model)
    slimtune.inject(model, slimtune.LoraConfig(r=8, alpha=16, target_modules="all-linear"))
    loss = lambda: sum(model(b[None], labels=b[None]).loss.item() for b in held) / len(held)  # noqa: E731
    with torch.no_grad():
        before = loss()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for i in range(steps):
        batch = train[(2 * i) % len(train):][:2]
        model(batch, labels=batch).loss.backward()
        opt.step(), opt.zero_grad()
    model.eval()
    with torch.no_grad():
        return before, loss()


PEAK_CHILD = r"""
import sys, torch, slimtune
from slimtune.assets import smollm2_path, load_smollm2
from slimtune.quant import load_quantized
torch.manual_seed(0)
if sys.argv[1] == "qlora":
    model, _ = load_quantized(smollm2_path())
else:
    model, _ = load_smollm2()
slimtune.inject(model, slimtune.LoraConfig(r=8, alpha=16, target_modules="all-linear"))
x = torch.randint(0, 49152, (2, 128))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
model.train()
for _ in range(2):
    model(x, labels=x).loss.backward(); opt.step(); opt.zero_grad()
print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')))  # KiB, own peak
"""


def peak_rss_mib(kind: str) -> float:
    out = subprocess.run([sys.executable, "-c", PEAK_CHILD, kind], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024.0


def quality(n_eval: int, steps: int) -> list[str]:
    from slimtune.assets import load_smollm2
    from slimtune.data import shakespeare_text, token_blocks
    from slimtune.quant import expected_bits_per_param, quantize_model

    model, tok = load_smollm2()
    blocks = token_blocks(tok, shakespeare_text(), 128, max_blocks=4000)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(blocks), generator=g)
    held, train = blocks[order[:n_eval]], blocks[order[n_eval:n_eval + 2 * steps]]
    t = time.perf_counter()
    ppl_fp32 = perplexity(model, held)
    report = quantize_model(model)
    ppl_nf4 = perplexity(model, held)
    rows = [f"- quantized weights: {report.quantized_params:,} in {report.quantized_bytes:,} bytes = "
            f"**{report.bits_per_param:.4f} bits/param** (layout formula {expected_bits_per_param():.4f}); "
            f"kept apart: {', '.join(report.kept)} and {report.other_params:,} other values in "
            f"{report.other_bytes / 2**20:.1f} MiB",
            f"- held-out perplexity, {n_eval} Shakespeare blocks of 128 tokens: fp32 **{ppl_fp32:.3f}**, "
            f"NF4 **{ppl_nf4:.3f}** ({100 * (ppl_nf4 / ppl_fp32 - 1):+.2f}%)"]
    lora = finetune_drop(False, train, held, steps, 2e-4)
    qlora = finetune_drop(True, train, held, steps, 2e-4)
    rows.append(f"- {steps} steps of LoRA r=8 (batch 2 x 128 tokens, AdamW lr 2e-4), held-out loss: "
                f"LoRA {lora[0]:.4f} -> {lora[1]:.4f} (drop {lora[0] - lora[1]:.4f}); "
                f"QLoRA {qlora[0]:.4f} -> {qlora[1]:.4f} (drop {qlora[0] - qlora[1]:.4f})")
    rss_lora, rss_qlora = peak_rss_mib("lora"), peak_rss_mib("qlora")
    rows.append(f"- peak RSS of a fresh process loading SmolLM2-135M and training 2 LoRA steps (2 x 128 tokens): "
                f"LoRA on fp32 base {rss_lora:.0f} MiB, QLoRA via load_quantized {rss_qlora:.0f} MiB")
    rows.append(f"- (took {time.perf_counter() - t:.0f} s)")
    return rows


def write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quality", action="store_true", help="SmolLM2 figures instead of throughput")
    ap.add_argument("--runs", type=int, default=30, help="paired runs per case (median reported)")
    ap.add_argument("--tokens", type=int, default=256, help="tokens per linear forward+backward")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--eval-blocks", type=int, default=16)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    RESULTS.mkdir(exist_ok=True)
    if args.quality:
        body = "\n".join(quality(args.eval_blocks, args.steps))
        write(RESULTS / "nf4_quality.md", f"# NF4 / QLoRA on SmolLM2-135M\n\nMachine: {machine('bitsandbytes')}\n\n{body}\n")
    else:
        rows = throughput(args.runs, args.tokens)
        text = (f"# NF4: slimtune vs bitsandbytes on CPU (same run)\n\nMachine: {machine('bitsandbytes')}\n\n"
                f"`python benchmarks/nf4.py --runs {args.runs} --tokens {args.tokens}"
                f"{f' --threads {args.threads}' if args.threads else ''}`; median of {args.runs} paired runs; "
                "ratio = bitsandbytes time / slimtune time (above 1: slimtune faster).\n\n" + "\n".join(rows) + "\n\n"
                "`--threads 1` pins torch to one thread (bitsandbytes' C kernels may still use OpenMP threads); on a "
                "2-core machine shared with other work, more threads mostly measure the scheduler. Paired runs "
                "alternate which library goes first.\n")
        write(RESULTS / "nf4.md", text)
    print((RESULTS / ("nf4_quality.md" if args.quality else "nf4.md")).read_text())


if __name__ == "__main__":
    main()
