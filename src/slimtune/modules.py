"""Module-tree surgery shared by injection, adapter control and quantization (torch only)."""

from __future__ import annotations

from torch import nn


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at dotted path ``name`` in ``model`` (e.g. ``model.layers.0.self_attn.q_proj``), in place.

    Raises AttributeError when the parent path does not exist.
    """
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
