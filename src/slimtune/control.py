"""Model-level adapter operations: merge, unmerge, unload, choose active adapters, disable, delete.

All of these find adapters through the wrapper types, never by parameter-name substrings.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

from torch import nn

from slimtune.layers.base import AdaptedLayer, TrainedCopy
from slimtune.methods.prompt import prompt_of, remove_prompt
from slimtune.modules import set_submodule


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLayer):
            yield name, module


def _wrappers(model: nn.Module) -> Iterator[tuple[str, AdaptedLayer | TrainedCopy]]:
    for name, module in model.named_modules():
        if isinstance(module, (AdaptedLayer, TrainedCopy)):
            yield name, module


def adapter_names(model: nn.Module) -> tuple[str, ...]:
    """Every adapter injected into ``model``, in injection order."""
    return tuple(getattr(model, "slimtune_configs", {}))


def active_adapters(model: nn.Module) -> tuple[str, ...]:
    """The adapters forward applies, in order (the model-wide active set)."""
    return tuple(getattr(model, "slimtune_active", adapter_names(model)))


def _check_names(model: nn.Module, names: Sequence[str], what: str) -> tuple[str, ...]:
    names = (names,) if isinstance(names, str) else tuple(names)
    known = adapter_names(model)
    for n in names:
        if n not in known:
            raise ValueError(f"{what}={n!r}: no such adapter; the model has {list(known) or 'none'}")
    return names


def set_active(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make ``names`` (one or several, applied in that order) the active adapters.

    Raises RuntimeError while adapters are merged, since the merged weights would silently stay.
    """
    names = _check_names(model, names, "adapter_names")
    if any(layer.merged for _, layer in adapted_layers(model)):
        raise RuntimeError("cannot change the active adapters while some are merged; call slimtune.unmerge(model) first")
    for _, module in _wrappers(model):
        have = module.adapters if isinstance(module, AdaptedLayer) else module.copies
        module.active = tuple(n for n in names if n in have)
    model.slimtune_active = names


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from every layer, and unwrap layers left with no adapter.

    Raises ValueError for an unknown name and RuntimeError when the adapter is merged into some base
    weight (unmerge first); both before anything is removed, so the model is never left half-deleted.
    """
    _check_names(model, (name,), "adapter_name")
    merged_in = [n for n, layer in adapted_layers(model) if name in layer.merged]
    if merged_in:
        raise RuntimeError(f"adapter {name!r} is merged into the base weight of {merged_in[0]} "
                           f"(and {len(merged_in) - 1} more layers); call slimtune.unmerge(model) before deleting it")
    if type(model.slimtune_configs[name]).__name__ == "PromptTuningConfig":
        remove_prompt(model)
    for module_name, module in list(_wrappers(model)):
        have = module.adapters if isinstance(module, AdaptedLayer) else module.copies
        if name in have:
            module.remove(name)
        if not len(have):
            set_submodule(model, module_name, module.base_layer if isinstance(module, AdaptedLayer) else module.original)
    configs = dict(model.slimtune_configs)
    del configs[name]
    model.slimtune_configs = configs
    model.slimtune_active = tuple(n for n in active_adapters(model) if n != name)


def merge(model: nn.Module, adapter_names: Sequence[str] | None = None, safe: bool = False) -> None:
    """Add the active (or named) adapters into their base weights: W' = W0 + s B A.

    Idempotent: merging an already-merged adapter does nothing. With ``safe=True`` a
    non-finite result raises ValueError naming the adapter, and that layer is left unmerged.
    """
    names = active_adapters(model) if adapter_names is None else _check_names(model, adapter_names, "adapter_names")
    configs = getattr(model, "slimtune_configs", {})
    for n in names:
        if type(configs.get(n)).__name__ == "PromptTuningConfig":
            raise TypeError(f"adapter {n!r} is prompt tuning: virtual tokens are inputs, not a weight update, so "
                            "there is nothing to merge; keep the prompt (save_adapter) or set_active() other adapters")
    for module_name, layer in adapted_layers(model):
        layer.merge(tuple(n for n in names if n in layer.active), safe=safe, module_name=module_name)


def unmerge(model: nn.Module) -> None:
    """Subtract every merged adapter from its base weight, restoring W0 (to float tolerance)."""
    for module_name, layer in adapted_layers(model):
        layer.unmerge(module_name)


def merge_and_unload(model: nn.Module, safe: bool = False) -> nn.Module:
    """Merge the active adapters and return the model with every slimtune module removed.

    Modules trained in full (``modules_to_save``) are replaced by the active adapter's copy.
    The result is a plain model that ``save_pretrained`` writes and plain transformers loads.
    """
    merge(model, safe=safe)
    for name, module in list(_wrappers(model)):
        new = module.base_layer if isinstance(module, AdaptedLayer) else module.current()
        set_submodule(model, name, new)
    for attr in ("slimtune_configs", "slimtune_active"):
        model.__dict__.pop(attr, None)
    return model


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model inside the block: merged adapters are unmerged first, re-merged after."""
    merged = {name: layer.merged for name, layer in adapted_layers(model)}
    unmerge(model)
    wrappers = [m for _, m in _wrappers(model)] + ([prompt_of(model)] if prompt_of(model) is not None else [])
    for m in wrappers:
        m.disabled = True
    try:
        yield model
    finally:
        for m in wrappers:
            m.disabled = False
        for name, layer in adapted_layers(model):
            if merged.get(name):
                layer.merge(merged[name], module_name=name)
