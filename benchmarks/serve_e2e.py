"""The server end to end on SmolLM2-135M (fp32, CPU): requests/s, tokens/s and p50/p95 latency through HTTP with
the `openai` client, for 1, 4 and 16 LoRA adapters (r=8 on q,v; random weights), and the base alone as the
reference in the same run. REQUESTS requests of NEW greedy tokens each, all sent at once, spread evenly over the
adapters. Run under the heavy lock:
    flock /work/wt/notes/heavy.lock env PYTHONPATH=src:. python benchmarks/serve_e2e.py
Writes benchmarks/results/serve_e2e.md.
"""

from __future__ import annotations

import concurrent.futures
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

REQUESTS, NEW, COUNTS = 32, 16, (0, 1, 4, 16)
OUT = Path(__file__).parent / "results" / "serve_e2e.md"


def run(url: str, models: list[str]) -> tuple[float, list[float], int]:
    """(wall s, sorted latencies, completion tokens) for REQUESTS requests sent at once."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600)

    def one(i: int) -> tuple[float, int]:
        t0 = time.perf_counter()
        r = client.completions.create(model=models[i % len(models)], prompt=f"Story {i}: once upon a time",
                                      max_tokens=NEW, temperature=0)
        return time.perf_counter() - t0, r.usage.completion_tokens

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(REQUESTS) as pool:
        results = list(pool.map(one, range(REQUESTS)))
    return time.perf_counter() - t0, sorted(r[0] for r in results), sum(r[1] for r in results)


def main() -> None:
    from slimtune.assets import load_smollm2
    from slimtune.serve.app import create_app
    from slimtune.serve.model import MultiAdapterModel
    from slimtune.serve.registry import AdapterRegistry
    from tests.serve.helpers import slimtune_adapter
    from tests.serve.server import running

    torch.set_num_threads(2)
    base, tok = load_smollm2()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(max(COUNTS)):
            slimtune_adapter(base, Path(tmp) / f"a{i}", i, std=0.05, r=8, target_modules=("q_proj", "v_proj"))
        model = MultiAdapterModel(copy.deepcopy(base), tok)
        with running(create_app(model, AdapterRegistry(model, tmp), "base", max_batch=REQUESTS)) as url:
            run(url, ["base"])  # warm-up
            for k in COUNTS:
                models = [f"a{i}" for i in range(k)] or ["base"]
                run(url, models)  # warm-up: loads the adapters (first use reads them from disk)
                wall, lat, tokens = run(url, models)
                rows.append(f"| {k or 'base only'} | {REQUESTS / wall:.2f} | {tokens / wall:.0f} | "
                            f"{lat[len(lat) // 2]:.2f} | {lat[int(0.95 * (len(lat) - 1))]:.2f} |")
    lines = ["# serve_e2e: the server through HTTP and the openai client", "",
             f"SmolLM2-135M fp32 on CPU ({torch.get_num_threads()} threads); {REQUESTS} requests sent at once, "
             f"{NEW} greedy tokens each, spread evenly over the adapters (LoRA r=8 on q,v); adapters loaded by a "
             "warm-up round first.", "",
             "| adapters | requests/s | tokens/s | p50 latency (s) | p95 latency (s) |", "|---|---|---|---|---|",
             *rows]
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
