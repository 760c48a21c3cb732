"""Helpers shared by the benchmark scripts: a one-line machine description and a process's own peak RSS."""

from __future__ import annotations

import importlib
import os
import platform
import resource
import time
from pathlib import Path

import torch


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram() -> str:
    try:
        line = next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal"))
        return f", {int(line.split()[1]) / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        return ""


def machine(*libraries: str) -> str:
    """'CPU, N cores, RAM; torch X (T threads), <library> <version>..., Python Y' for a results file."""
    import torch

    threads = torch.get_num_threads()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    libs = "".join(f", {name} {importlib.import_module(name).__version__}" for name in libraries)
    return (f"{_cpu_name()}, {os.cpu_count()} logical CPUs{_ram()}, {gpu}; torch {torch.__version__} "
            f"({threads} thread{'s' if threads > 1 else ''}){libs}, Python {platform.python_version()}, "
            f"{platform.system()}")


def own_peak_rss() -> int:
    """This process's peak RSS in bytes.

    Read from VmHWM, which belongs to the address space: ``ru_maxrss`` of a child started by a big parent
    reports the parent's peak, because Linux folds the old address space's high-water mark into it at exec.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux: best available


def train_step(model, opt, ids, autocast: bool = False) -> float:
    """One causal-LM training step (forward with labels = inputs, backward, optimizer step); seconds.

    ``autocast``: the forward runs under ``torch.autocast(device, torch.bfloat16)``, the mixed-precision
    recipe trainers use (HF ``TrainingArguments(bf16=True)``)."""
    t0 = time.perf_counter()
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0
