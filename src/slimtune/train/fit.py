"""``train.batch_size: auto``: a run that fits by construction, chosen from slimtune.memory's estimate (no torch).

Hugging Face's ``auto_find_batch_size`` halves the batch on each out-of-memory error; here the micro-batch, the
gradient accumulation (keeping ``train.effective_batch``) and gradient checkpointing are predicted before any
weight is loaded, from the model's config.json alone:

    arch = architecture_of(cfg.model.name)
    choice = choose_fit(cfg, arch, budget_bytes(cfg.train.memory, "cpu"), "cpu")   # or NothingFits
    cfg = apply_fit(cfg, choice)                                                    # numbers, not "auto"

A configuration fits when its estimate (weights + gradients + optimizer + activations), plus the transient
logits buffers of backward (:func:`slimtune.memory.plan.transient_bytes`) and a reserve for what is not a
tensor of the step (the CUDA context; on CPU the Python/torch runtime, tokenizer and data), is within the budget.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimtune.config import BottleneckConfig, FreezeConfig, LoraConfig, PromptTuningConfig
from slimtune.memory.arch import Architecture
from slimtune.memory.estimate import Estimate, estimate
from slimtune.memory.plan import RESERVE_BYTES, Recipe, nothing_fits, transient_bytes
from slimtune.memory.spec import Method, Precision, Workload
from slimtune.train.config import AUTO, RunConfig

CPU_RESERVE_BYTES = 0.25 * 2**30  # the Python/torch runtime, tokenizer and data rows: not tensors of the step
WEIGHT_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
OPTIMIZERS = {"adamw": "adamw", "adamw8bit": "adamw-8bit"}  # offload: see estimator_inputs
GIB = 2**30


class NothingFits(ValueError):
    """Not even batch 1 with gradient checkpointing fits the budget (the message says how much more it needs)."""


@dataclass(frozen=True)
class FitChoice:
    """What ``auto`` chose: micro-batch x accumulation (= the effective batch), checkpointing, and the bytes.

    ``estimate``: the four residents of one step; ``transient``: backward's logits buffers; ``reserve``: what
    the budget keeps back; ``capacity``: the budget; ``budget``: where it came from (``train.memory=8GB``).
    """

    batch: int
    grad_accum: int
    checkpointing: bool
    estimate: float
    transient: float
    reserve: float
    capacity: float
    budget: str
    processes: int = 1  # torchrun processes, each running this micro-batch: the effective batch counts them all

    @property
    def peak(self) -> float:
        """Estimated peak bytes of a training step: the residents plus the transient buffers."""
        return self.estimate + self.transient

    def describe(self) -> str:
        """``auto-fit: batch_size 4 x grad_accum 2, gradient checkpointing off; estimated peak 1.20 GiB ...``."""
        procs = f" x {self.processes} processes" if self.processes > 1 else ""
        return (f"auto-fit: batch_size {self.batch} x grad_accum {self.grad_accum}{procs} (effective batch "
                f"{self.batch * self.grad_accum * self.processes}), gradient checkpointing {'on' if self.checkpointing else 'off'}; "
                f"estimated peak {self.peak / GIB:.2f} GiB (+ {self.reserve / GIB:.2f} GiB reserve) of "
                f"{self.capacity / GIB:.2f} GiB ({self.budget})")


def architecture_of(name: str) -> Architecture:
    """The shapes of ``model.name`` from its config alone (the bundled SmolLM2, a HF folder, a .gguf file).

    Raises slimtune.train.model.ModelLoadError for a name that is none of these, ValueError for an
    architecture the estimator does not know (it names the known model types).
    """
    from slimtune.memory.arch import from_hf_config
    from slimtune.train.model import resolve

    folder, gguf = resolve(name)
    if gguf is None:
        return from_hf_config(folder)
    from transformers import AutoConfig  # GGUF metadata -> a config, without reading the tensors

    return from_hf_config(AutoConfig.from_pretrained(folder, gguf_file=gguf).to_dict())


def estimator_method(cfg: RunConfig) -> Method:
    """The run's adapter in the estimator's words (nf4 + LoRA = qlora; a regex target: every linear, an upper
    bound, since the estimator matches names)."""
    a = cfg.adapter
    if isinstance(a, LoraConfig):
        name = "dora" if a.use_dora else "qlora" if cfg.quantize == "nf4" else "lora"
        targets = a.target_modules
        targets = tuple(targets) if not isinstance(targets, str) else ("all-linear",)
        return Method(name, rank=a.r, targets=targets)
    if isinstance(a, BottleneckConfig):
        return Method("bottleneck", adapter_dim=a.size)
    if isinstance(a, PromptTuningConfig):
        return Method("prompt", prompt_tokens=a.num_virtual_tokens)
    if isinstance(a, FreezeConfig):
        return Method("freeze", trainable_layers=max(1, a.last_n_blocks))
    return Method("full")


def estimator_inputs(cfg: RunConfig, batch: int, checkpointing: bool, device: str
                     ) -> tuple[Method, Precision, Workload]:
    """(Method, Precision, Workload) of one micro-batch of ``cfg`` on ``device`` (``cpu`` or ``cuda``).

    Weights in ``model.dtype`` (nf4 under ``quantize: nf4``); AdamW moments in the trainable weights' dtype
    (torch's AdamW); ``offload`` keeps the optimizer state in CPU RAM, so on a GPU it costs none of the budget.
    Rows are ``data.max_length`` tokens (packed rows exactly; padded rows at most).
    """
    method = estimator_method(cfg)
    weight = "nf4" if cfg.quantize == "nf4" else WEIGHT_DTYPES[cfg.model.dtype]
    if cfg.train.optimizer == "offload":
        optimizer = "none" if device == "cuda" else "adamw"
    else:
        optimizer = OPTIMIZERS[cfg.train.optimizer]
    precision = Precision(None if method.name == "qlora" else weight, optimizer=optimizer)
    precision = dataclasses.replace(precision, optim_dtype=precision.trainable_dtype(method.name))
    return method, precision, Workload(batch, cfg.data.max_length, checkpointing, "sdpa", device)


def estimate_for(cfg: RunConfig, arch: Architecture, batch: int, checkpointing: bool, device: str) -> Estimate:
    """slimtune.memory's estimate of one micro-batch of ``cfg``. Raises ValueError (named) from the estimator."""
    return estimate(arch, *estimator_inputs(cfg, batch, checkpointing, device))


def lora_dropout_bytes(cfg: RunConfig, arch: Architecture, batch: int, checkpointing: bool, device: str) -> float:
    """Bytes of LoRA's dropout keep-masks, which the estimator leaves out (it models dropout 0): on CPU,
    slimtune's ``LoraLinearFn`` keeps a 1-byte (tokens, d_in) mask per adapted linear (on CUDA it re-draws the
    mask in backward and keeps nothing). Every block keeps its masks; under checkpointing only the block being
    recomputed does. 0 for other methods, dropout 0, or CUDA."""
    from slimtune.memory.arch import targeted_linears

    a = cfg.adapter
    if device != "cpu" or not isinstance(a, LoraConfig) or a.use_dora or a.dropout == 0:
        return 0.0
    # targeted_linears lists the adapted linears of every block (the output head is never adapted)
    all_d_in = sum(s.d_in for s in targeted_linears(arch, estimator_method(cfg).targets))
    tokens = batch * cfg.data.max_length
    return float(tokens * all_d_in / (arch.layers if checkpointing else 1))


def step_bytes(cfg: RunConfig, arch: Architecture, batch: int, checkpointing: bool, device: str) -> float:
    """The residents of one micro-batch: the estimator's four components plus LoRA's CPU dropout masks."""
    return (estimate_for(cfg, arch, batch, checkpointing, device).total
            + lora_dropout_bytes(cfg, arch, batch, checkpointing, device))


def reserve_for(device: str) -> float:
    """Bytes of the budget that are not the step's tensors: the CUDA context, or the CPU runtime."""
    return RESERVE_BYTES if device == "cuda" else CPU_RESERVE_BYTES


def divisors(n: int) -> list[int]:
    """Divisors of ``n``, largest first: the micro-batches that keep ``n`` examples per optimizer step."""
    return [b for b in range(n, 0, -1) if n % b == 0]


def choose_fit(cfg: RunConfig, arch: Architecture, capacity: float, device: str = "cpu",
               budget: str = "train.memory", processes: int = 1) -> FitChoice:
    """The largest micro-batch dividing each process's share of ``cfg.effective_batch`` that fits ``capacity``
    bytes (one process's budget): without gradient checkpointing first (no recompute), then with it;
    ``train.grad_checkpointing: true`` is kept on.

    Raises NothingFits (slimtune plan's sentence: what batch 1 with checkpointing needs, and how much more
    than ``capacity`` that is), ValueError from the estimator (an unknown target module, named).
    """
    reserve = reserve_for(device)
    per_process = per_process_batch(cfg.effective_batch, processes)
    for ckpt in ((True,) if cfg.train.grad_checkpointing else (False, True)):
        for batch in divisors(per_process):
            total = step_bytes(cfg, arch, batch, ckpt, device)
            transient = transient_bytes(arch, batch, cfg.data.max_length)
            if total + transient + reserve <= capacity:
                return FitChoice(batch, per_process // batch, ckpt, total, transient, reserve, capacity,
                                 budget, processes)
    need = step_bytes(cfg, arch, 1, True, device) + transient_bytes(arch, 1, cfg.data.max_length) + reserve
    method, precision, _ = estimator_inputs(cfg, 1, True, device)
    recipe = Recipe(method.name, precision.base_dtype(method.name), method.rank, precision.optimizer)
    raise NothingFits(nothing_fits(
        f"{recipe.label()}, batch 1, gradient checkpointing, {cfg.data.max_length} tokens", need, capacity,
        f"you have ({budget})", "Use a shorter data.max_length, quantize: nf4, a smaller adapter, or more memory."))


class UnevenBatch(ValueError):
    """The effective batch does not split evenly over the processes."""


def per_process_batch(effective: int, processes: int) -> int:
    """Examples each of ``processes`` processes trains per optimizer step; UnevenBatch unless it divides."""
    if effective % processes:
        raise UnevenBatch(f"train.effective_batch={effective}: must be a multiple of the {processes} processes "
                          f"(each trains an equal share of every step): use {processes * max(1, effective // processes)}"
                          f" or {processes * (effective // processes + 1)}")
    return effective // processes


def available_bytes(device: str) -> float:
    """Free memory: CUDA's free bytes on the current device, or the machine's available RAM (MemAvailable)."""
    if device == "cuda":
        import torch

        return float(torch.cuda.mem_get_info()[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def budget_bytes(memory: str | None, device: str, local_processes: int = 1) -> tuple[float, str]:
    """(bytes, where they came from) for one process: ``train.memory`` (a per-process budget, like a GPU's), or
    None: what is free now on ``device``; on CPU the machine's RAM is shared by its ``local_processes``."""
    from slimtune.memory.presets import gpu_bytes

    if memory is not None:
        return gpu_bytes(memory), f"train.memory={memory}"
    free = available_bytes(device)
    if device == "cuda":
        return free, f"free GPU memory {free / GIB:.1f} GiB"
    share = f" / {local_processes} processes" if local_processes > 1 else ""
    return free / local_processes, f"available RAM {free / GIB:.1f} GiB{share}"


def apply_fit(cfg: RunConfig, choice: FitChoice) -> RunConfig:
    """``cfg`` with the chosen numbers in place of ``auto`` (what config.yaml records and a resume re-reads)."""
    train = dataclasses.replace(cfg.train, batch_size=choice.batch, grad_accum=choice.grad_accum,
                                grad_checkpointing=choice.checkpointing, memory=None, effective_batch=None)
    return dataclasses.replace(cfg, train=train)


def resolve_auto(cfg: RunConfig, device: str = "cpu", recorded: dict[str, Any] | None = None,
                 processes: int = 1, local_processes: int = 1) -> tuple[RunConfig, FitChoice | None]:
    """``cfg`` unchanged (and None) unless ``train.batch_size`` is auto; else the fitted config and the choice.

    ``processes``: torchrun's world size (``train.effective_batch`` is split over them); ``local_processes``:
    how many of them share this machine's RAM when no ``train.memory`` is given.
    ``recorded``: the ``train`` section of the config.yaml an interrupted run wrote; a resumed run keeps its
    batch, accumulation and checkpointing (free memory may have changed since, the data order must not).
    Raises NothingFits, ModelLoadError, ValueError (see :func:`choose_fit`).
    """
    if cfg.train.batch_size != AUTO:
        return cfg, None
    arch = architecture_of(cfg.model.name)
    capacity, budget = budget_bytes(cfg.train.memory, device, local_processes)
    if recorded and isinstance(recorded.get("batch_size"), int):
        batch, ckpt = recorded["batch_size"], bool(recorded.get("grad_checkpointing"))
        choice = FitChoice(batch, int(recorded.get("grad_accum", 1)), ckpt, step_bytes(cfg, arch, batch, ckpt, device),
                           transient_bytes(arch, batch, cfg.data.max_length), reserve_for(device), capacity,
                           budget + ", as recorded by the interrupted run", processes)
    else:
        choice = choose_fit(cfg, arch, capacity, device, budget, processes)
    return apply_fit(cfg, choice), choice


def recorded_train(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The ``train`` section of ``run_dir/config.yaml`` (what an earlier start of this run resolved), or None."""
    import yaml

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    d = yaml.safe_load(path.read_text(encoding="utf-8"))
    train = d.get("train") if isinstance(d, dict) else None
    return train if isinstance(train, dict) else None
