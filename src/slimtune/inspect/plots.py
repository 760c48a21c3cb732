"""The pictures of ``slimtune report``: one function per figure, data in, a matplotlib Figure out.

Figures are built on ``matplotlib.figure.Figure`` directly (no pyplot state, no display needed); the caller
saves them (:func:`png_bytes`).
"""

from __future__ import annotations

import io
import math
import re
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import LogLocator, MaxNLocator

from slimtune.inspect.adapter import ModuleStats

_LAYER = re.compile(r"^(?:.*?\.)?(\d+)\.(.+)$")  # "...layers.<i>.<rest>"
ENERGY_STYLES = {"90%": ":", "95%": "--", "99%": "-."}


def layer_and_kind(name: str) -> tuple[int | None, str]:
    """(block index, module kind) of a module name: ``model.layers.3.self_attn.q_proj`` -> (3, "q_proj");
    (None, the name's last part) outside numbered blocks."""
    m = _LAYER.match(name)
    if m is None:
        return None, name.rsplit(".", 1)[-1]
    return int(m.group(1)), m.group(2).rsplit(".", 1)[-1]


def norm_grid(modules: Sequence[ModuleStats]) -> tuple[list[int], list[str], np.ndarray]:
    """(layers, kinds, grid): ||dW||_F by block (rows) and module kind (columns, in first-seen order); NaN where
    a block has no such module. Modules outside numbered blocks are left out."""
    cells = {}
    for m in modules:
        layer, kind = layer_and_kind(m.name)
        if layer is not None:
            cells[(layer, kind)] = m.norm
    kinds = _canonical_order(sorted({kind for _, kind in cells}))
    layers = sorted({layer for layer, _ in cells})
    grid = np.full((len(layers), len(kinds)), np.nan)
    for (layer, kind), v in cells.items():
        grid[layers.index(layer), kinds.index(kind)] = v
    return layers, kinds, grid


def _canonical_order(kinds: list[str]) -> list[str]:
    """Attention then MLP in forward order when the names are the usual ones; others after, alphabetically."""
    order = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
             "query", "key", "value", "dense", "c_attn", "c_proj", "c_fc"]
    return sorted(kinds, key=lambda k: (order.index(k) if k in order else len(order), k))


def norm_heatmap(modules: Sequence[ModuleStats], title: str = "Which layers changed most") -> Figure:
    """Heatmap of ||dW||_F: blocks as rows (first block on top), module kinds as columns, values written in."""
    layers, kinds, grid = norm_grid(modules)
    fig = Figure(figsize=(1.15 * max(len(kinds), 3) + 2.2, 0.3 * max(len(layers), 4) + 1.6), layout="constrained")
    ax = fig.add_subplot()
    if not layers:
        ax.text(0.5, 0.5, "no modules in numbered blocks", ha="center", va="center")
        ax.set_axis_off()
        return fig
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(kinds)), kinds, rotation=30, ha="right")
    ax.set_yticks(range(len(layers)), [str(x) for x in layers])
    ax.set_ylabel("block")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="||dW||_F", shrink=0.9)
    if grid.size <= 400:  # values readable up to ~50 blocks x 8 kinds
        hi = np.nanmax(grid)
        for (i, j), v in np.ndenumerate(grid):
            if not math.isnan(v):
                ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=7,
                        color="black" if v > 0.6 * hi else "white")
    return fig


def weight_histogram(weights: dict[str, Any], title: str = "Adapter weight magnitudes") -> Figure:
    """Histogram of |w| for each factor kind ("A", "B") on log-spaced bins; exact zeros counted in the legend
    (a log axis cannot show them)."""
    fig = Figure(figsize=(7.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    arrays = {k: np.abs(np.asarray(v, dtype=np.float64)).ravel() for k, v in weights.items()}
    nonzero = np.concatenate([a[a > 0] for a in arrays.values()]) if arrays else np.zeros(0)
    if nonzero.size == 0:
        ax.text(0.5, 0.5, "every adapter weight is zero", ha="center", va="center")
        ax.set_axis_off()
        return fig
    lo, hi = np.percentile(nonzero, 0.01), nonzero.max()
    bins = np.logspace(math.log10(lo), math.log10(hi * 1.0001), 60)
    for (kind, a), color in zip(arrays.items(), ("tab:blue", "tab:orange", "tab:green")):
        zeros = int((a == 0).sum())
        label = f"lora_{kind} ({a.size:,} values" + (f", {zeros:,} exactly 0)" if zeros else ")")
        counts, _ = np.histogram(np.clip(a[a > 0], lo, None), bins=bins)
        ax.stairs(counts, bins, fill=True, alpha=0.4, color=color, label=label)
        ax.stairs(counts, bins, color=color, lw=1.2)
    ax.set_xscale("log")
    ax.set_xlabel("|weight|")
    ax.set_ylabel("count")
    ax.set_title(title)
    ax.legend(frameon=False)
    return fig


def spectra_figure(modules: Sequence[ModuleStats], title: str = "Singular values of dW per module") -> Figure:
    """One panel per module kind: s_i / s_1 against i (log scale) for every block's module, coloured by depth,
    with the median rank keeping 90/95/99% of ||dW||_F^2 marked as vertical lines."""
    by_kind: dict[str, list[tuple[int, ModuleStats]]] = {}
    for m in modules:
        layer, kind = layer_and_kind(m.name)
        by_kind.setdefault(kind, []).append((layer if layer is not None else 0, m))
    kinds = _canonical_order(list(by_kind))
    cols = min(4, max(len(kinds), 1))
    rows = max(1, math.ceil(len(kinds) / cols))
    fig = Figure(figsize=(3.4 * cols + 0.8, 2.9 * rows + 0.9), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True)
    depth = max((layer for items in by_kind.values() for layer, _ in items), default=0) or 1
    cmap = _colormap()
    for ax, kind in zip(axes.flat, kinds):
        _spectra_panel(ax, kind, by_kind[kind], depth, cmap)
    for ax in list(axes.flat)[len(kinds):]:
        ax.set_axis_off()
    for ax in axes[:, 0]:
        ax.set_ylabel("s_i / s_1")
    handles = [Line2D([], [], color="crimson", ls=style, label=f"rank keeping {level} of ||dW||_F^2 (median)")
               for level, style in ENERGY_STYLES.items()]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, frameon=False, fontsize=8)
    fig.suptitle(title + " (colour: block depth, dark = first block)")
    return fig


def _colormap() -> Any:
    import matplotlib

    return matplotlib.colormaps["viridis"]


def _spectra_panel(ax: Any, kind: str, items: list[tuple[int, ModuleStats]], depth: int, cmap: Any) -> None:
    for layer, m in sorted(items, key=lambda x: x[0]):
        s = np.asarray(m.singular_values)
        if s.size and s[0] > 0:
            ax.plot(np.arange(1, s.size + 1), s / s[0], color=cmap(layer / depth), lw=1.0, alpha=0.8,
                    marker="." if s.size <= 16 else None, ms=3)
    medians = []
    for level, style in ENERGY_STYLES.items():
        ranks = [m.energy_ranks[level] for _, m in items if m.energy_ranks.get(level)]
        if ranks:
            med = float(np.median(ranks))
            medians.append(f"{med:g}")
            ax.axvline(med, color="crimson", ls=style, lw=1.1)
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(numticks=6))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("index i")
    ax.set_title(f"{kind}: 90/95/99% at rank {'/'.join(medians)}" if medians else kind, fontsize=9)


def loss_curves(records: Sequence[dict[str, Any]], title: str = "Loss during training") -> Figure:
    """Train loss per logged step and eval loss where evaluated, from ``metrics.jsonl`` records."""
    fig = Figure(figsize=(7.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    train = [(r["step"], r["loss"]) for r in records if isinstance(r.get("loss"), (int, float))]
    evals = [(r["step"], r["eval_loss"]) for r in records if isinstance(r.get("eval_loss"), (int, float))]
    if train:
        ax.plot(*zip(*train), color="tab:blue", lw=1.3, label="train loss")
    if evals:
        ax.plot(*zip(*evals), color="tab:orange", lw=1.8, marker="o", label="eval loss")
        for step, v in (evals[0], evals[-1]):
            ax.annotate(f"{v:.3f}", (step, v), textcoords="offset points", xytext=(4, 6), fontsize=8,
                        color="tab:orange")
    if not train and not evals:
        ax.text(0.5, 0.5, "no loss records in metrics.jsonl", ha="center", va="center")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean token cross-entropy)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if train or evals:
        ax.legend(frameon=False)
    return fig


def png_bytes(fig: Figure, dpi: int = 110) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()
