"""Freeze-tuning (train the last N blocks and/or named modules in full) and full fine-tuning, the baseline.

Neither adds a module: they only choose which existing parameters have ``requires_grad``. They share
the config schema and the report with the adapter methods so a comparison is one config field apart.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from torch import nn

from slimtune.config import FreezeConfig, FullConfig
from slimtune.names import suffix_match
from slimtune.params import ParamCounts, count_params

BLOCK_LIST_NAMES = ("layers", "h", "layer", "blocks", "block")


@dataclass(frozen=True)
class TrainingReport(ParamCounts):
    """Which modules train, and trainable vs total parameters, for a method that adds no adapter."""

    method: str
    trained: tuple[str, ...]
    trainable_params: int
    total_params: int

    def __str__(self) -> str:
        shown = ", ".join(self.trained[:8]) + (f", ... {len(self.trained) - 8} more" if len(self.trained) > 8 else "")
        return f"slimtune {self.method}: training {shown or 'everything'}\n{self.counts_line()}"


def find_blocks(model: nn.Module, layers_pattern: str | None = None) -> tuple[str, nn.ModuleList]:
    """The transformer's block list: the longest ``nn.ModuleList`` named ``layers_pattern`` (or one of
    ``layers``, ``h``, ``layer``, ``blocks``). Raises ValueError naming the lists found otherwise."""
    wanted = (layers_pattern,) if layers_pattern else BLOCK_LIST_NAMES
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    hits = [(n, m) for n, m in lists if n.rsplit(".", 1)[-1] in wanted]
    if not hits:
        found = ", ".join(n for n, _ in lists[:6]) or "none"
        raise ValueError(f"freeze.layers_pattern={layers_pattern!r}: no block list named {' / '.join(wanted)} in "
                         f"{type(model).__name__}; module lists found: {found}")
    return max(hits, key=lambda nm: len(nm[1]))


def _match_modules(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    names = [n for n, _ in model.named_modules() if n]
    out = []
    for t in targets:
        hits = [n for n in names if suffix_match(n, (t,))]
        if not hits:
            near = difflib.get_close_matches(t, names + sorted({n.rsplit(".", 1)[-1] for n in names}), n=3, cutoff=0.5)
            raise ValueError(f"freeze.modules={t!r} matches no module in {type(model).__name__}; "
                             f"closest names: {', '.join(near) or 'none'}")
        out += hits
    return out


def apply_freeze(model: nn.Module, config: FreezeConfig) -> TrainingReport:
    """Freeze everything, then unfreeze the last ``config.last_n_blocks`` blocks and ``config.modules``.

    Raises ValueError when the model has fewer blocks than asked or a named module does not exist.
    """
    trained: list[str] = []
    if config.last_n_blocks:
        list_name, blocks = find_blocks(model, config.layers_pattern)
        if config.last_n_blocks > len(blocks):
            raise ValueError(f"freeze.last_n_blocks={config.last_n_blocks}: {list_name} has only {len(blocks)} blocks")
        trained += [f"{list_name}.{i}" for i in range(len(blocks) - config.last_n_blocks, len(blocks))]
    trained += _match_modules(model, config.modules)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in trained:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    return TrainingReport("freeze", tuple(trained), *count_params(model))


def apply_full(model: nn.Module, config: FullConfig) -> TrainingReport:
    """Make every parameter trainable (the input embedding stays frozen with ``freeze_embeddings``)."""
    for p in model.parameters():
        p.requires_grad_(True)
    trained = ("everything",)
    if config.freeze_embeddings:
        get = getattr(model, "get_input_embeddings", None)
        emb = get() if callable(get) else None
        if emb is None:
            raise ValueError(f"full.freeze_embeddings=True: {type(model).__name__} has no get_input_embeddings()")
        for p in emb.parameters():
            p.requires_grad_(False)  # tied with the LM head in many models: that stays frozen too
        trained = ("everything but the input embedding",)
    return TrainingReport("full", trained, *count_params(model))
