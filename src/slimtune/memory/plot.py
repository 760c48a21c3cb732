"""Stacked bars of the memory components per method (matplotlib, imported when called)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from slimtune.memory.estimate import COMPONENTS, Estimate

COLORS = {"weights": "#4C72B0", "gradients": "#DD8452", "optimizer": "#C44E52", "activations": "#55A868"}


def plot_components(estimates: Sequence[Estimate], path: str | Path, title: str = "") -> Path:
    """Write a PNG with one stacked bar per estimate (GB, 1e9 bytes), totals on top. Returns the path.

    Raises ValueError when ``estimates`` is empty.
    """
    if not estimates:
        raise ValueError("estimates=[]: need at least one estimate to plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [e.method.name for e in estimates]
    fig, ax = plt.subplots(figsize=(1.6 * len(estimates) + 3, 4.5))
    bottom = [0.0] * len(estimates)
    for name in COMPONENTS:
        values = [e[name] / 1e9 for e in estimates]
        ax.bar(labels, values, bottom=bottom, label=name, color=COLORS[name], width=0.6)
        bottom = [b + v for b, v in zip(bottom, values)]
    for i, total in enumerate(bottom):
        ax.text(i, total, f"{total:.1f} GB", ha="center", va="bottom", fontsize=9)
    w = estimates[0].workload
    ax.set_ylabel("GB (1e9 bytes)")
    ax.set_ylim(0, max(bottom) * 1.12)
    ax.set_title(title or f"{estimates[0].model}: batch {w.batch} x seq {w.seq}"
                 f"{', checkpointing' if w.checkpointing else ''}")
    ax.legend(loc="upper right", frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
