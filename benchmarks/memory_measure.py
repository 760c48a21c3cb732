"""Estimate vs measured, by component, on this machine: writes benchmarks/results/memory_measure.md.

    .venv/bin/python benchmarks/memory_measure.py [--quick]

Real SmolLM2-135M (the bundled weights) and tiny random Llama, GPT-2 and BERT configs; full, freeze,
LoRA, DoRA, bottleneck adapters and prompt tuning (fp32), QLoRA (NF4 base, bf16 compute) on Llama; two
batch sizes and sequence lengths; with and without gradient checkpointing. SmolLM2 runs one case per method.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from slimtune.memory.compare import measure_against_estimate
from slimtune.memory.spec import Method, Precision, Workload

TINY = {
    "tiny-llama": {"model_type": "llama", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 128,
                   "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                   "max_position_embeddings": 64, "tie_word_embeddings": False},
    "tiny-gpt2": {"model_type": "gpt2", "vocab_size": 128, "n_embd": 64, "n_layer": 2, "n_head": 4,
                  "n_positions": 64, "bos_token_id": 0, "eos_token_id": 0},
    "tiny-bert": {"model_type": "bert", "vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "intermediate_size": 128, "max_position_embeddings": 64},
}
KEYS = ("weights", "gradients", "optimizer", "activations", "total")


def cases(quick: bool):
    for name, cfg in TINY.items():
        for method in ("full", "freeze", "lora", "dora", "bottleneck", "prompt"):
            for batch, seq in ((1, 16), (3, 40)):
                for ckpt in (False, True):
                    yield name, cfg, Method(method, trainable_layers=1), Workload(batch, seq, ckpt)
        if name == "tiny-llama":  # QLoRA: NF4 blocks (Linear4bit) + bf16 LoRA; GPT-2's Conv1D is not quantized
            for batch, seq in ((1, 16), (3, 40)):
                for ckpt in (False, True):
                    yield name, cfg, Method("qlora"), Workload(batch, seq, ckpt)
    smol = [("lora", 2, 64, False), ("lora", 1, 32, True), ("full", 1, 32, False), ("freeze", 2, 32, True),
            ("qlora", 1, 32, False), ("dora", 2, 32, False), ("bottleneck", 1, 32, True), ("prompt", 2, 32, False)]
    if not quick:
        smol += [("lora", 1, 64, False), ("lora", 2, 32, True), ("freeze", 1, 64, False)]
    for method, batch, seq, ckpt in smol:
        yield "smollm2-135m", "smollm2-135m", Method(method), Workload(batch, seq, ckpt)


def main() -> None:
    quick = "--quick" in sys.argv
    rows, worst = [], 0.0
    start = time.time()
    for name, ref, method, workload in cases(quick):
        est, meas = measure_against_estimate(ref, method, Precision(), workload)
        e, m = est.as_dict(), meas.as_dict()
        errs = [(e[k] - m[k]) / m[k] if m[k] else 0.0 for k in KEYS]
        worst = max(worst, *(abs(x) for x in errs))
        cells = " | ".join(f"{m[k] / 2**20:.3f} / {x:+.2%}" for k, x in zip(KEYS, errs))
        rows.append(f"| {name} | {method.name} | {workload.batch}x{workload.seq} | "
                    f"{'yes' if workload.checkpointing else 'no'} | {cells} |")
        print(rows[-1], flush=True)
    header = ("| model | method | batch x seq | ckpt | " + " | ".join(f"{k} MiB / err" for k in KEYS) + " |\n"
              "|" + "---|" * (4 + len(KEYS)))
    out = Path(__file__).parent / "results" / "memory_measure.md"
    out.write_text(
        "# Estimate vs measured (CPU, fp32; qlora: NF4 base, bf16 compute; torch AdamW)\n\n"
        "dora: LoRA r=8 with use_dora on the default targets; bottleneck: BottleneckConfig(size=64) after the "
        "attention and MLP outputs (relu); prompt: 20 virtual tokens.\n\n"
        "Each cell: measured MiB / (estimate - measured) / measured. Produced by "
        "`benchmarks/memory_measure.py`"
        f"{' --quick' if quick else ''} in {time.time() - start:.0f} s. Worst error: {worst:.3%}.\n\n"
        + header + "\n" + "\n".join(rows) + "\n", encoding="utf-8")
    print(f"worst error {worst:.3%}; written {out}")


if __name__ == "__main__":
    main()
