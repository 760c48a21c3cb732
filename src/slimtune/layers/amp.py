"""Dtype rules the custom autograd functions share under mixed precision (torch.autocast).

A custom ``autograd.Function`` runs its forward under whatever autocast state is active but its backward
without it, so letting autocast pick dtypes inside forward leaves backward meeting tensors of another
dtype. Instead each function asks :func:`compute_dtype` once in forward, runs its maths in that dtype
with autocast off (:func:`no_autocast`), remembers it, and uses it again in backward.
"""

from __future__ import annotations

import contextlib

import torch


def compute_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a custom function's matmuls run in: autocast's lower-precision dtype when autocast is on
    for ``device_type`` (what plain ``nn.Linear`` ops get under autocast, as in Hugging Face PEFT), else
    ``dtype``, the caller's own: an adapter's parameter dtype (fp32 adapters on a bf16 base compute in
    fp32, as PEFT casts x up to the adapter's dtype), a 4-bit layer's input dtype."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except RuntimeError:  # a device type autocast does not know (meta): no autocast there
        pass
    return dtype


def narrower(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """The dtype with fewer bytes per element (``a`` on a tie): what a saved activation is kept in."""
    return b if b.itemsize < a.itemsize else a


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32: the dtype sums over tokens (bias and magnitude gradients) run in."""
    return torch.promote_types(dtype, torch.float32)


def no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast off inside a custom function, whose dtypes are chosen explicitly by :func:`compute_dtype`."""
    try:
        return torch.autocast(device_type, enabled=False)
    except RuntimeError:
        return contextlib.nullcontext()


def adapter_dtype(base_dtype: torch.dtype, choice: str = "float32") -> torch.dtype:
    """The dtype new adapter parameters get on a base computing in ``base_dtype``.

    ``choice="float32"`` (the default, as Hugging Face PEFT's ``autocast_adapter_dtype``): fp32 for a
    16-bit base, since AdamW's small updates round away in bf16/fp16; fp32 and fp64 bases keep theirs.
    ``choice="base"``: ``base_dtype`` itself (half the adapter memory on a 16-bit base).
    Raises ValueError for another choice.
    """
    if choice not in ("float32", "base"):
        raise ValueError(f"adapter_dtype={choice!r}: must be one of float32, base")
    if choice == "float32" and base_dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return base_dtype
