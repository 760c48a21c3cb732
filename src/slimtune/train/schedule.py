"""Learning-rate schedules: linear warmup, then cosine, linear or constant; pure functions of the step.

``lr_factor(step, total, warmup, kind)`` multiplies the base learning rate for optimizer step ``step``
(0-based: the first update is step 0). Warmup ramps linearly *up to* the base rate, reaching it at step
``warmup - 1``, so no step is wasted on lr = 0 (Hugging Face's ramp starts at 0). After warmup, with
``progress = (step - warmup) / (total - warmup)``:

    cosine    0.5 * (1 + cos(pi * progress))   1 at the end of warmup, 0 at step ``total``
    linear    1 - progress                     1 at the end of warmup, 0 at step ``total``
    constant  1

Steps past ``total`` keep the factor of step ``total`` (0 for cosine and linear).
"""

from __future__ import annotations

import math

import torch

KINDS = ("cosine", "linear", "constant")


def _check_int(name: str, value: object, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        what = "a positive integer" if lo == 1 else "a non-negative integer"
        raise ValueError(f"{name}={value!r}: must be {what}")


def check_schedule(total: int, warmup: int, kind: str) -> None:
    """Raise ValueError naming the argument when ``total`` < 1, ``warmup`` < 0 or ``kind`` is unknown."""
    _check_int("total", total, 1)
    _check_int("warmup", warmup, 0)
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: must be one of {', '.join(KINDS)}")


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """The learning-rate multiplier for 0-based optimizer step ``step`` (see the module docstring).

    Raises ValueError for a negative step, ``total`` < 1, ``warmup`` < 0 or an unknown ``kind``.
    """
    check_schedule(total, warmup, kind)
    _check_int("step", step, 0)
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, total: int, warmup: int,
                   kind: str) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` applying :func:`lr_factor` to every parameter group's initial lr (LoRA+ groups keep
    their ratios). Call ``scheduler.step()`` once after each ``optimizer.step()``.

    The lambda is a plain function (not a callable object), so ``state_dict()`` holds only numbers and
    saves as JSON. Raises ValueError as :func:`lr_factor` for bad arguments.
    """
    check_schedule(total, warmup, kind)

    def factor(step: int) -> float:
        return lr_factor(step, total, warmup, kind)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
