"""The wrapper every adapter lives in, and the protocol an adapter implements.

``AdaptedLayer`` wraps (never subclasses) a base layer. It holds one object per adapter in a
single ``ModuleDict`` keyed by adapter name, the active set as a ``tuple[str, ...]``, and the
merged set likewise. ``forward()`` never merges or unmerges: merged adapters are already inside
the base weight, so forward simply skips them.
"""

from __future__ import annotations

from typing import Iterator, Protocol, runtime_checkable

import torch
from torch import Tensor, nn



@runtime_checkable
class Adapter(Protocol):
    """What an adapter module provides. Found through this interface, never by name matching."""

    mergeable: bool

    def adapter_params(self) -> Iterator[nn.Parameter]:
        """The trainable parameters of this adapter."""

    def forward(self, x: Tensor, base_out: Tensor, base_layer: nn.Module) -> Tensor:
        """Return the adapted output given the base layer's input ``x`` and output ``base_out``."""

    def delta_weight(self, base_layer: nn.Module) -> Tensor:
        """The fp32 update to add to ``base_layer.weight`` (same shape and layout)."""

    def merged_weight(self, weight: Tensor, base_layer: nn.Module) -> Tensor:
        """The base weight with this adapter merged in (``weight``'s dtype and layout)."""

    def unmerged_weight(self, weight: Tensor, base_layer: nn.Module) -> Tensor:
        """The inverse of ``merged_weight``: the base weight before this adapter was merged."""

    def file_tensors(self) -> dict[str, Tensor]:
        """Tensors to save, keyed by Hugging Face PEFT's names relative to the wrapped module."""

    def load_file_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Copy tensors (keys as in ``file_tensors``) into this adapter's parameters."""


class AdaptedLayer(nn.Module):
    """A base layer plus named adapters; output = adapters applied in active order to base(x)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active: tuple[str, ...] = ()
        self.merged: tuple[str, ...] = ()
        self.disabled = False

    # -- forward -----------------------------------------------------------------------
    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return out
        for name in self.active:
            if name not in self.merged:
                out = self.adapters[name](x, out, self.base_layer)
        return out

    # -- bookkeeping ---------------------------------------------------------------------
    def add(self, name: str, adapter: nn.Module) -> None:
        if name in self.adapters:
            raise ValueError(f"adapter_name={name!r}: this layer already has an adapter of that name")
        self.adapters[name] = adapter
        self.active = self.active + (name,)

    def remove(self, name: str) -> None:
        if name in self.merged:
            raise RuntimeError(f"adapter {name!r} is merged into the base weight; unmerge it before deleting")
        del self.adapters[name]
        self.active = tuple(n for n in self.active if n != name)

    # -- merging -------------------------------------------------------------------------
    def merge(self, names: tuple[str, ...], safe: bool = False, module_name: str = "") -> None:
        """Add each named adapter's delta into the base weight. Already-merged names are skipped."""
        for name in names:
            if name in self.merged:
                continue
            adapter = self.adapters[name]
            if not adapter.mergeable:
                raise TypeError(f"adapter {name!r} on {module_name or type(self.base_layer).__name__} "
                                f"({type(adapter).__name__}) cannot be merged into the base weight: "
                                f"{getattr(adapter, 'not_mergeable_reason', 'it is not a weight update')}")
            weight = _base_weight_param(self.base_layer, module_name)
            new = adapter.merged_weight(weight.data, self.base_layer)
            if safe and not torch.isfinite(new).all():
                raise ValueError(f"merging adapter {name!r} into {module_name or 'layer'} gives non-finite "
                                 "weights; the adapter is broken (NaN/inf) and was not merged")
            with torch.no_grad():  # in place on the parameter itself: bumps its version counter for caches
                weight.copy_(new)
            self.merged = self.merged + (name,)

    def unmerge(self, module_name: str = "") -> None:
        """Subtract merged adapters from the base weight, newest first. No-op when none is merged."""
        weight = _base_weight_param(self.base_layer, module_name) if self.merged else None
        for name in reversed(self.merged):
            with torch.no_grad():
                weight.copy_(self.adapters[name].unmerged_weight(weight.data, self.base_layer))
        self.merged = ()

    def extra_repr(self) -> str:
        return f"active={self.active}, merged={self.merged}, disabled={self.disabled}"


def _base_weight_param(layer: nn.Module, module_name: str) -> nn.Parameter:
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, nn.Parameter) or not weight.is_floating_point():
        raise TypeError(
            f"{module_name or type(layer).__name__}: cannot merge into a {type(layer).__name__} "
            "(its weight is not a floating-point tensor; for a 4-bit base call "
            "slimtune.quant.dequantize_model(model) first)")
    return weight


class TrainedCopy(nn.Module):
    """``modules_to_save``: a module trained fully; each adapter owns a copy, the original stays."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original = original
        self.copies = nn.ModuleDict()
        self.active: tuple[str, ...] = ()
        self.disabled = False

    def add(self, name: str, copy: nn.Module) -> None:
        self.copies[name] = copy
        self.active = self.active + (name,)

    def remove(self, name: str) -> None:
        del self.copies[name]
        self.active = tuple(n for n in self.active if n != name)

    def current(self) -> nn.Module:
        """The module forward uses: the first active copy, or the original when none / disabled."""
        if not self.disabled:
            for name in self.active:
                return self.copies[name]
        return self.original

    def forward(self, *args, **kwargs):
        return self.current()(*args, **kwargs)
