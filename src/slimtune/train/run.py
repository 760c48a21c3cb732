"""``slimtune train``: one run from a run config, start to finish (the library function the CLI calls).

Reads top to bottom: seed, data, model, scores before, adapter, optimizer and schedule, resume, the loop,
scores after, the final adapter. The loop itself (forward, backward, clip, step, log, checkpoints) lives in
``slimtune.train.loop``; the pieces it is given are built here.

Under torchrun every process runs this same function (``slimtune.train.distributed``): the config, the output
folder and every data row are checked before the process group is joined, so a bad input stops every rank
with the same error; rank 0 alone logs and writes files.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

import slimtune
from slimtune.quant.export import save_pretrained_atomic
from slimtune.train import evaluate as ev
from slimtune.train.checkpoint import latest_checkpoint, load_checkpoint
from slimtune.train.config import RunConfig, save_run_config
from slimtune.train.datasets import RunData, build_run_data
from slimtune.train.distributed import (World, local_processes, process_group, seed_ranks, shard_base,
                                        world_from_env, wrap_ddp)
from slimtune.train.fit import NothingFits, UnevenBatch, recorded_train, resolve_auto
from slimtune.train.loop import LoopConfig, train_loop
from slimtune.train.model import DTYPES, ModelLoadError, enable_checkpointing, load_model, load_tokenizer
from slimtune.train.sampler import EpochSampler
from slimtune.train.schedule import make_scheduler

ADAPTER = "default"
SAMPLES = 3  # held-out prompts whose greedy replies are shown before and after


class RunError(ValueError):
    """A run that cannot start as configured (checkpoints of another run in output_dir, fp16 on CPU, ...)."""


@dataclass
class RunResult:
    output_dir: Path
    adapter_dir: Path  # adapter/ (a PEFT folder), or model/ for freeze / full fine-tuning
    steps: int
    before: dict[str, float]
    after: dict[str, float]
    samples: list[dict[str, str]] = field(default_factory=list)  # prompt, expected, before, after

    def summary(self) -> str:
        lines = [f"trained {self.steps} steps; adapter saved to {self.adapter_dir}"]
        for key, after in self.after.items():
            lines.append(f"  {key:<20} before {_fmt(key, self.before.get(key))}   after {_fmt(key, after)}")
        for s in self.samples:
            lines.append(f"  {s['prompt'][-70:]!r}\n    expected {s['expected']!r}; before {s['before']!r}; "
                         f"after {s['after']!r}")
        where = str(self.adapter_dir)
        if (self.adapter_dir / "pytorch_lora_weights.safetensors").is_file():  # data.format: images
            lines.append(f"use it: pipe.load_lora_weights({where!r}) (diffusers) or "
                         f"slimtune.diffusion.load_lora_weights(pipe, {where!r})")
        elif self.adapter_dir.name == "model":
            lines.append(f"use it: AutoModelForCausalLM.from_pretrained({where!r}) (a plain Hugging Face folder)")
        else:
            lines.append(f"use it: slimtune.load_adapter(model, {where!r}) or "
                         f"peft.PeftModel.from_pretrained(model, {where!r})")
        return "\n".join(lines)


def _fmt(key: str, v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:7.1%}" if key.endswith(("accuracy", "exact_match")) else f"{v:7.4f}"


def train(cfg: RunConfig, *, resume: bool = False, log: Callable[[str], None] = print) -> RunResult:
    """Fine-tune ``cfg.model`` on ``cfg.data`` with ``cfg.adapter``; returns the scores before and after.

    Raises RunError, slimtune.train.config.RunConfigError, BadRow (a bad data row), ModelLoadError,
    DistributedError (torchrun's environment).
    """
    world = world_from_env()
    log = log if world.is_main else (lambda line: None)
    run_dir = Path(cfg.output_dir)
    _check_start(cfg, run_dir, resume, world)
    cfg = _auto_fit(cfg, run_dir, resume, log, world)  # auto -> numbers, before anything heavy loads (LMs only:
    # the config refuses batch_size auto with data.format: images, so an image run passes through unchanged)
    seed_everything(cfg.train.seed)
    if cfg.data.format == "images":  # a diffusers UNet on an image folder: the diffusion capability's run
        from slimtune.diffusion.run import train_images

        return train_images(cfg, run_dir, resume, log, world)
    task = "classification" if cfg.data.format == "classification" else "causal"
    tokenizer = load_tokenizer(cfg.model.name)
    data = build_run_data(cfg.data, tokenizer, cfg.train.seed)  # every bad row is found before the model loads
    general = _general_blocks(tokenizer, cfg) if task == "causal" else None  # the forgetting check's text
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_run_config(cfg, run_dir / "config.yaml")  # the resolved config, overrides applied
    with process_group(world):  # every input is checked: only now wait for the other ranks
        return _fit(cfg, world, tokenizer, data, general, task, run_dir, resume, log)


def _fit(cfg: RunConfig, world: World, tokenizer: Any, data: RunData, general: torch.Tensor | None, task: str,
         run_dir: Path, resume: bool, log: Callable[[str], None]) -> RunResult:
    """The model, the scores before, the adapter, the training, the scores after and the saved result."""
    num_labels = len(data.label_names or ()) if task == "classification" else None
    model = load_model(cfg.model.name, cfg.model.dtype, num_labels=num_labels, pad_token_id=tokenizer.pad_token_id)
    model.config.use_cache = False  # training: a KV cache would also switch off the packed block-diagonal mask
    if world.device.type == "cuda":  # the GPU when there is one (one per rank under torchrun: NCCL needs it)
        model.to(world.device)
        data.device = world.device
    log(f"device: {world.device}" + (" (no CUDA GPU visible)" if world.device.type == "cpu" else ""))
    log(f"data: {data.stats.rows} rows ({data.stats.skipped} skipped, {data.stats.truncated} truncated), "
        f"{len(data.train_rows)} training rows{' packed' if data.packed else ''}, {len(data.eval_examples)} eval")
    if cfg.quantize == "nf4":
        log(str(slimtune.quantize_model(model, compute_dtype=DTYPES[cfg.model.dtype])))
    before, answers_before = _scores(model, tokenizer, data, cfg, general)
    log(str(slimtune.prepare(model, cfg.adapter, ADAPTER, tokenizer=tokenizer)))
    if cfg.train.grad_checkpointing:
        enable_checkpointing(model)
    model.train()
    net = _distribute(model, cfg, world, log)
    total = total_steps(cfg, len(data.train_rows), world.world_size)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, total, cfg.train.warmup_steps(total), cfg.train.scheduler)
    sampler = EpochSampler(len(data.train_rows), cfg.train.batch_size, cfg.train.seed)
    start = resume_from(run_dir, model, optimizer, scheduler, sampler, log, world) if resume else 0
    loop_cfg = LoopConfig(max_steps=total, grad_accum=cfg.train.grad_accum, max_grad_norm=cfg.train.max_grad_norm,
                          precision=cfg.train.precision, log_every=cfg.train.log_every,
                          eval_every=cfg.train.eval_every, save_every=cfg.train.save_every,
                          keep_last=cfg.train.keep_last)
    evaluate = (lambda: {"eval_loss": ev.eval_loss(model, data.eval_batches(cfg.train.batch_size))}
                if data.eval_examples and task == "causal" else None)
    train_loop(model, optimizer, scheduler, sampler, data.batch, loop_cfg, run_dir, ADAPTER, start_step=start,
               evaluate=evaluate, echo=log, world=world, net=net)  # plain progress lines when not a terminal
    after, answers_after = _scores(model, tokenizer, data, cfg, general)
    adapter_dir = (_save_result(model, tokenizer, cfg, run_dir) if world.is_main
                   else run_dir / ("model" if cfg.adapter.method in ("freeze", "full") else "adapter"))
    samples = [{"prompt": c[-1]["content"], "expected": t, "before": b, "after": a}
               for c, t, b, a in zip(data.conversations, data.answers, answers_before, answers_after)][:SAMPLES]
    result = RunResult(run_dir, adapter_dir, total, before, after, samples)
    if world.is_main:
        write_summary(run_dir, result)
    world.barrier()  # the others return once rank 0 has written the result
    return result


def _distribute(model: nn.Module, cfg: RunConfig, world: World, log: Callable[[str], None]) -> nn.Module:
    """The module the loop's forward runs through: ``model`` itself for one process, else (its frozen base
    sharded by FSDP2 when ``train.fsdp``) wrapped in DDP over the trainable parameters."""
    if not world.distributed:
        return model
    if cfg.train.fsdp:
        blocks = shard_base(model, world)
        log(f"fsdp: frozen base of {blocks} blocks sharded over {world.world_size} processes")
    t = cfg.train
    log(f"processes: {world.world_size} ({'nccl' if world.device.type == 'cuda' else 'gloo'}); effective batch "
        f"{t.batch_size * t.grad_accum * world.world_size} (batch_size {t.batch_size} x grad_accum {t.grad_accum} "
        f"x {world.world_size} processes)")
    net = wrap_ddp(model, world)
    seed_ranks(cfg.train.seed, world)
    return net


def _save_result(model: nn.Module, tokenizer: Any, cfg: RunConfig, run_dir: Path) -> Path:
    """The run's product: ``adapter/`` (a PEFT folder) or, for freeze / full fine-tuning, which train the model
    itself, ``model/`` (a plain Hugging Face folder with the tokenizer), written to a temp folder and renamed."""
    if cfg.adapter.method not in ("freeze", "full"):
        return slimtune.save_adapter(model, run_dir / "adapter", ADAPTER, base_model_name_or_path=cfg.model.name)
    target = run_dir / "model"
    if target.exists():  # written by an earlier end of this run (a resumed run ends again): replaced
        shutil.rmtree(target)
    return save_pretrained_atomic(model, target, tokenizer)


def _auto_fit(cfg: RunConfig, run_dir: Path, resume: bool, log: Callable[[str], None], world: World) -> RunConfig:
    """Resolve ``train.batch_size: auto`` from the model's config alone and print the choice; RunError when
    nothing fits. The budget is the device's the run trains on: free GPU memory, or the machine's RAM."""
    try:
        cfg, choice = resolve_auto(cfg, world.device.type, recorded_train(run_dir) if resume else None,
                                   world.world_size, local_processes())
    except (NothingFits, UnevenBatch) as e:
        raise RunError(str(e)) from None
    except ModelLoadError:
        raise
    except ValueError as e:  # an architecture the estimator does not know: say which field asked for it
        raise RunError(f"train.batch_size='auto': cannot estimate this model's memory: {e}; give a number") from None
    if choice is not None:
        log(choice.describe())
    return cfg


def _check_start(cfg: RunConfig, run_dir: Path, resume: bool, world: World = World()) -> None:
    if cfg.train.fsdp and not world.distributed:
        raise RunError("train.fsdp=True: shards the frozen base over several processes, and this is one; run "
                       "`slimtune train --nproc N` (torchrun) or set train.fsdp: false")
    if cfg.train.precision == "fp16" and not torch.cuda.is_available():
        raise RunError("train.precision='fp16': needs a CUDA GPU (fp16 with a loss scaler); on CPU use bf16 or fp32")
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"output_dir={str(run_dir)!r}: is a file; a run writes a folder (adapter/, checkpoints/, "
                       "metrics.jsonl) there: choose another output_dir")
    if not resume and latest_checkpoint(run_dir) is not None:
        raise RunError(f"output_dir={str(run_dir)!r} holds checkpoints of an earlier run: pass --resume to continue "
                       "it, or choose another output_dir")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def total_steps(cfg: RunConfig, n_rows: int, processes: int = 1) -> int:
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    per_step = cfg.train.batch_size * cfg.train.grad_accum * processes  # the effective batch
    return max(1, math.ceil(cfg.train.epochs * n_rows / per_step))


def make_optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    t = cfg.train
    if t.loraplus_ratio is not None:
        return slimtune.create_loraplus_optimizer(model, lr=t.lr, ratio=t.loraplus_ratio, weight_decay=t.weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    if t.optimizer == "adamw8bit":
        return slimtune.AdamW8bit(params, lr=t.lr, weight_decay=t.weight_decay)
    if t.optimizer == "offload":
        return slimtune.OffloadedOptimizer(params, torch.optim.AdamW, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)


def resume_from(run_dir: Path, model, optimizer, scheduler, sampler, log, world: World = World()) -> int:
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        log(f"--resume: no complete checkpoint in {run_dir / 'checkpoints'}; starting from step 0")
        return 0
    state = load_checkpoint(ckpt, model=model, adapter_name=ADAPTER, optimizer=optimizer, scheduler=scheduler,
                            sampler=sampler, world=world)
    log(f"resumed from {ckpt} (step {state['step']})")
    return int(state["step"])


def _scores(model: nn.Module, tokenizer: Any, data: RunData, cfg: RunConfig,
            general: torch.Tensor | None) -> tuple[dict[str, float], list[str]]:
    """Held-out scores (eval loss or accuracy, exact match of short chat answers, loss on general text) and the
    greedy answers behind the exact match."""
    out: dict[str, float] = {}
    batches = data.eval_batches(cfg.train.batch_size)
    if cfg.data.format == "classification":
        if batches:
            out["eval_accuracy"] = ev.accuracy(model, batches)
        return out, []
    if batches:
        out["eval_loss"] = ev.eval_loss(model, batches)
    answers = ev.generate_answers(model, tokenizer, data.conversations) if data.conversations else []
    if answers:
        out["eval_exact_match"] = ev.exact_match(answers, data.answers)
    if general is not None:
        out["general_text_loss"] = ev.text_loss(model, general)
    return out, answers


GENERAL_BLOCKS, GENERAL_LEN = 16, 128


def _general_blocks(tokenizer: Any, cfg: RunConfig) -> torch.Tensor:
    """Token blocks (16, 128) of text the adapter was not trained on: ``data.general`` or a slice of the bundled
    Shakespeare (Romeo and Juliet): the forgetting check."""
    from slimtune.data import shakespeare_text, token_blocks

    text = (Path(cfg.data.general).read_text(encoding="utf-8", errors="replace") if cfg.data.general
            else shakespeare_text("romeo"))
    try:
        return token_blocks(tokenizer, text, GENERAL_LEN, max_blocks=GENERAL_BLOCKS)
    except ValueError as e:  # before any training: the run stops here, naming the field
        raise RunError(f"data.general={cfg.data.general!r}: {e} (the forgetting check needs at least "
                       f"{GENERAL_LEN} tokens of text)") from None


def write_summary(run_dir: Path, result: RunResult) -> None:
    """One last line in metrics.jsonl: the scores before and after."""
    record = {"event": "summary", "steps": result.steps, "before": result.before, "after": result.after,
              "adapter": str(result.adapter_dir)}
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
