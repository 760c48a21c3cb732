"""The sweep's picture: one panel per swept key, eval loss (else accuracy) against its values (matplotlib)."""

from __future__ import annotations

from typing import Any, Sequence

from slimtune.sweep.grid import Axis


def plot_sweep(axes: Sequence[Axis], rows: Sequence[dict[str, Any]], best: int | None) -> "Any":
    """A Figure: per axis, each run's score at its value (points), the mean per value (line), the best run
    starred. The score is eval loss (lower is better) when the runs have one, else accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    metric = "eval_loss" if any(r.get("eval_loss") is not None for r in rows) else "accuracy"
    label = "eval loss (lower is better)" if metric == "eval_loss" else "accuracy (higher is better)"
    fig = Figure(figsize=(4.2 * len(axes) + 0.6, 3.8), layout="constrained")
    panels = fig.subplots(1, len(axes), sharey=True, squeeze=False)[0]
    for ax, axis in zip(panels, axes):
        xs = {text: i for i, text in enumerate(axis.texts)}
        points = [(xs[r[axis.key]], r[metric], i) for i, r in enumerate(rows)
                  if r.get(metric) is not None and r.get(axis.key) in xs]
        ax.scatter([p[0] for p in points], [p[1] for p in points], color="tab:blue", alpha=0.7, label="a run")
        means = [(x, [p[1] for p in points if p[0] == x]) for x in range(len(axis.texts))]
        means = [(x, sum(v) / len(v)) for x, v in means if v]
        ax.plot([m[0] for m in means], [m[1] for m in means], color="tab:blue", lw=1.5, label="mean")
        for x, y, i in points:
            if i == best:
                ax.scatter([x], [y], marker="*", s=260, color="tab:red", zorder=3, label="best run")
        ax.set_xticks(range(len(axis.texts)), axis.texts)
        ax.set_xlim(-0.5, len(axis.texts) - 0.5)
        ax.set_xlabel(axis.key)
        ax.grid(alpha=0.3)
        ax.ticklabel_format(axis="y", useOffset=False)  # plain losses, not "+1.08e1" offsets
    panels[0].set_ylabel(label)
    handles, labels = panels[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), fontsize=8, frameon=False)
    fig.suptitle(f"sweep: {len(rows)} runs, {label.split(' (')[0]} by swept value")
    return fig
