"""The training loop: forward, backward, clip, step, log; the rest lives in small helpers below it.

One optimizer step = ``grad_accum`` micro-batches, each ``make_batch(sampler.next_batch())``, all drawn
before the first forward. The step's loss is the mean over *every trained token* of those micro-batches
(labels != -100 after the causal shift; rows for a classifier): each micro-batch contributes its summed
loss divided by the step's total count, so the summed gradients are exactly those of one big batch even
when packing or chat masking leaves the micro-batches with unequal token counts (what HF Trainer does with
``num_items_in_batch``). A step with no trained token at all has loss 0/0 = NaN: TrainingDiverged.

Several processes (a ``World`` from ``slimtune.train.distributed``, ``model`` wrapped in DDP as ``net``): every
rank draws the step's ``grad_accum x world_size`` micro-batches from the same sampler and trains on its share;
the trained-token count is all-reduced first, and each rank's loss is multiplied by ``world_size`` because DDP
averages the ranks' gradients, so the update is that of one process with ``grad_accum x world_size``. Only the
step's last micro-batch all-reduces gradients (DDP ``no_sync`` before it). A NaN/inf loss is detected after
the step's losses are summed over the ranks, so every rank stops at the same step. Rank 0 alone writes
metrics, progress and checkpoint files.

Precision: ``fp32``; ``bf16`` = ``torch.autocast(device, bfloat16)`` around the forward (trainable
tensors stay as they are, e.g. fp32 adapters); ``fp16`` = autocast float16 with ``torch.amp.GradScaler``,
CUDA only. Gradients are clipped over the trainable parameters only.

``run_dir/metrics.jsonl`` gets one JSON object per logged step
(``{"step", "loss", "lr", "tokens", "tokens_per_s", "elapsed_s", "grad_norm"}``, ``tokens`` cumulative,
``loss`` the trained-token-weighted mean since the last record) and one per evaluation
(``{"step", **evaluate()}``). On (re)start at ``start_step`` every line with a larger step is dropped first
(an atomic rewrite), so a resumed run's file reads as one run. When TensorBoard is installed the same
numbers go to ``run_dir/tensorboard/`` as scalars (events past ``start_step`` purged on resume).

Progress: a rich bar on a terminal; otherwise (CI logs, ``| tee``) one plain line to ``echo`` on logged
steps, at most every ``PLAIN_EVERY_S`` seconds (and always at the first and the last step). Both, and the
metrics file, live in ``slimtune.train.metrics``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from slimtune.train.checkpoint import save_checkpoint
from slimtune.train.distributed import World, no_sync
from slimtune.train.metrics import Metrics, progress_bar
from slimtune.train.sampler import EpochSampler

PRECISIONS = ("fp32", "bf16", "fp16")
IGNORE_INDEX = -100  # the label of an untrained token (prompt, padding, a packed example's first token)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; raised before that step's optimizer update (``.step``, ``.loss``)."""

    def __init__(self, step: int, loss: float = math.nan) -> None:
        self.step, self.loss = step, loss
        super().__init__(f"training diverged: loss is {loss} at step {step}; nothing was updated at this step "
                         "and the last complete checkpoint is kept (try a lower lr, max_grad_norm or bf16)")


def _positive_int(name: str, value: object, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}: must be a positive integer{' or None' if optional else ''}")


@dataclass(frozen=True)
class LoopConfig:
    """What the loop needs from the run config. Raises ValueError naming the field for a bad value."""

    max_steps: int
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    precision: str = "fp32"  # fp32 | bf16 | fp16 (CUDA only)
    log_every: int = 1
    eval_every: int | None = None
    save_every: int | None = None
    keep_last: int = 2

    def __post_init__(self) -> None:
        for name in ("max_steps", "grad_accum", "log_every", "keep_last"):
            _positive_int(name, getattr(self, name))
        _positive_int("eval_every", self.eval_every, optional=True)
        _positive_int("save_every", self.save_every, optional=True)
        norm = self.max_grad_norm
        if norm is not None and (isinstance(norm, bool) or not isinstance(norm, (int, float)) or not norm > 0
                                 or math.isinf(norm)):
            raise ValueError(f"max_grad_norm={norm!r}: must be a positive number or None (no clipping)")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}: must be one of {', '.join(PRECISIONS)}")


def train_loop(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
               sampler: EpochSampler, make_batch: Callable[[list[int]], dict[str, Tensor]], cfg: LoopConfig,
               run_dir: str | os.PathLike, adapter_name: str = "default", start_step: int = 0,
               evaluate: Callable[[], dict[str, float]] | None = None,
               log: Callable[[dict], None] | None = None, echo: Callable[[str], None] | None = None,
               world: World = World(), net: nn.Module | None = None) -> dict:
    """Train from ``start_step`` (0, or the step load_checkpoint returned) to ``cfg.max_steps``.

    ``make_batch(indices)`` returns the model's keyword arguments, labels included, on the model's device;
    a causal LM (integer labels (B, T)) returns ``.logits`` (B, T, V), any other model ``.loss`` (the mean
    over its rows). ``log`` gets every metrics record; ``echo`` the plain progress lines when stdout is not
    a terminal (nothing when None). Evaluates every ``eval_every`` steps and at the end (``evaluate()`` runs in
    eval mode under no_grad), then checkpoints every ``save_every`` steps and at the end. Returns
    ``{"step", "loss", "tokens", "elapsed_s", "checkpoint"}``. Raises TrainingDiverged on a NaN/inf loss
    (before the update), ValueError for fp16 off CUDA or a model with nothing to train.

    ``world`` / ``net``: this process's rank and ``model`` in DistributedDataParallel (the forward runs through
    ``net``; files, checkpoints and clipping use ``model``). ``log`` and ``echo`` are only called on rank 0.
    """
    run_dir = Path(run_dir)
    device = training_device(model, cfg.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    trainable = [p for p in model.parameters() if p.requires_grad]
    net = model if net is None else net
    log, echo = (log, echo) if world.is_main else (None, None)
    metrics = Metrics(run_dir, start_step, cfg, write=world.is_main)
    save = functools.partial(save_checkpoint, run_dir, model=model, adapter_name=adapter_name, optimizer=optimizer,
                             scheduler=scheduler, sampler=sampler, keep_last=cfg.keep_last, world=world)
    ckpt = None
    model.train()
    with progress_bar(cfg.max_steps, start_step, echo) as bar, contextlib.closing(metrics):
        for step in range(start_step + 1, cfg.max_steps + 1):
            drawn = [sampler.next_batch() for _ in range(cfg.grad_accum * world.world_size)]  # the global batch
            batches = [make_batch(indices) for indices in world.share(drawn)]  # this rank's micro-batches
            loss_sum, trained, tokens = forward_backward(net, batches, step, world, cfg.precision, device, scaler)
            grad_norm = clip_gradients(optimizer, scaler, trainable, cfg.max_grad_norm)  # clip
            lr = optimizer.param_groups[0]["lr"]
            scaler.step(optimizer)                                         # step
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            bar(metrics.step(step, loss_sum, trained, lr, tokens, grad_norm, log))  # log
            ckpt = after_step(step, cfg, model, device, evaluate, metrics, log, save) or ckpt
    return {"step": max(start_step, cfg.max_steps), "loss": metrics.last_loss, **metrics.totals(),
            "checkpoint": None if ckpt is None else str(ckpt)}


def forward_backward(net: nn.Module, batches: list[dict[str, Tensor]], step: int, world: World, precision: str,
                     device: torch.device, scaler: torch.amp.GradScaler) -> tuple[float, int, int]:
    """Forward and backward of one step's micro-batches on this rank, gradients accumulated in ``.grad``.
    Returns the step's (loss, trained count, tokens), summed over every rank. Raises TrainingDiverged for a
    NaN/inf loss: before that micro-batch's backward on a single process, after the step's backward (all
    ranks together, still before any update) on several."""
    trained = int(world.sum([sum(count_trained(b) for b in batches)])[0])  # the loss is the mean over these
    loss_sum, tokens = 0.0, 0
    for i, batch in enumerate(batches):
        with no_sync(net, sync=i == len(batches) - 1):  # DDP all-reduces once, in the step's last backward
            with autocast(device, precision):
                loss = summed_loss(net, batch) * world.world_size / trained  # forward (x W: DDP averages)
            if not world.distributed:
                finite_loss(loss, step)  # NaN/inf: stop before any update
            loss_sum += float(loss.detach()) / world.world_size
            scaler.scale(loss).backward()  # backward
        tokens += count_tokens(batch)
    if world.distributed:  # one all_reduce for the step's loss and tokens; every rank stops on NaN/inf together
        loss_sum, total = world.sum([loss_sum, tokens])
        return finite_loss(torch.tensor(loss_sum), step), trained, int(total)
    return loss_sum, trained, tokens


def after_step(step: int, cfg: LoopConfig, model: nn.Module, device: torch.device,
               evaluate: Callable[[], dict] | None, metrics: "Metrics", log: Callable[[dict], None] | None,
               save: Callable[..., Path]) -> Path | None:
    """Evaluate (eval mode, no_grad, the training precision's autocast), then checkpoint, when due.
    Evaluation comes first so the saved RNG state is the one the next step starts from whether or not the
    run is resumed there."""
    last = step == cfg.max_steps
    if evaluate is not None and cfg.eval_every is not None and (step % cfg.eval_every == 0 or last):
        was_training = model.training
        model.eval()
        with torch.no_grad(), autocast(device, cfg.precision):
            result = evaluate()
        model.train(was_training)
        metrics.write({"step": step, **{k: float(v) for k, v in result.items()}}, log)
    if last or (cfg.save_every is not None and step % cfg.save_every == 0):
        return save(step, extra=metrics.totals())
    return None


def training_device(model: nn.Module, precision: str) -> torch.device:
    """The device of the trainable parameters; ValueError for none, or for fp16 anywhere but CUDA."""
    p = next((p for p in model.parameters() if p.requires_grad), None)
    if p is None:
        raise ValueError("the model has no trainable parameters (requires_grad): inject an adapter first")
    if precision == "fp16" and p.device.type != "cuda":
        raise ValueError(f"precision='fp16': needs a CUDA device (the model is on {p.device.type}); "
                         "use bf16 or fp32 there")
    return p.device


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """torch.autocast for bf16 / fp16; nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def finite_loss(loss: Tensor, step: int) -> float:
    """``loss`` as a float; TrainingDiverged(step) when it is NaN or infinite."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise TrainingDiverged(step, value)
    return value


def is_causal(labels: Tensor) -> bool:
    """Integer labels (B, T): a causal LM's per-token labels (else a classifier's, one per row)."""
    return labels.dim() == 2 and not labels.is_floating_point()


def count_trained(batch: dict[str, Tensor]) -> int:
    """What the step's loss is averaged over: trained tokens of a causal batch (``labels[:, 1:] != -100``,
    the model predicts token t+1 from t so the first label never counts), else rows."""
    labels = batch["labels"]
    if is_causal(labels):
        return int((labels[:, 1:] != IGNORE_INDEX).sum())
    return int(labels.shape[0])


def causal_loss_sum(logits: Tensor, labels: Tensor) -> Tensor:
    """Summed next-token cross-entropy, in fp32: logits (B, T, V), labels (B, T) with -100 = not trained;
    position t predicts label t+1 (the shift HF's causal LM loss applies). Returns a 0-dim tensor."""
    vocab = logits.shape[-1]
    return torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, vocab),
                                             labels[:, 1:].reshape(-1).to(logits.device),
                                             ignore_index=IGNORE_INDEX, reduction="sum")


def summed_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """The micro-batch's loss summed over what count_trained counts (0-dim). A causal LM's loss is computed
    here from its logits (the model's own is a mean over this micro-batch only); a classifier's mean over
    rows is multiplied back by the rows."""
    labels = batch["labels"]
    if is_causal(labels):
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        # prompt tuning prepends virtual tokens: their positions carry no label, so score only the real ones
        return causal_loss_sum(logits[:, logits.shape[1] - labels.shape[1]:], labels)
    return model(**batch).loss * labels.shape[0]


def count_tokens(batch: dict[str, Tensor]) -> int:
    """Tokens in a batch: attention_mask's ones when there is one (padded rows), else every input id; a batch
    without tokens (images) counts its rows."""
    mask = batch.get("attention_mask")
    if mask is not None:
        return int(mask.sum())
    return int(batch["input_ids"].numel()) if "input_ids" in batch else int(batch["labels"].shape[0])


def clip_gradients(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, params: list[Tensor],
                   max_norm: float | None) -> float | None:
    """Clip the trainable parameters' gradients (unscaled first under fp16) to ``max_norm``; the norm before."""
    if max_norm is None:
        return None
    scaler.unscale_(optimizer)
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
