"""A sweep's results: one row per finished run (``result.json``), the table (results.md, results.csv), the plot.

Columns: every grid value; eval loss and accuracy (``eval_accuracy`` for classification, else exact match of the
chat answers) after training; trainable parameters and the estimated peak of one step (slimtune.memory, the
step's tensors); the measured peak resident memory of the run's process (everything: Python, torch, the
tokenizer, data, the model); wall time and training tokens/s. The best run (lowest eval loss, else highest
accuracy) is marked.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from slimtune.sweep.grid import Axis

if TYPE_CHECKING:  # pragma: no cover
    from slimtune.sweep.runner import SweepRun

MIB = 2**20
METRICS = ("eval_loss", "accuracy", "trainable_params", "est_peak_mib", "measured_peak_mib", "wall_s",
           "tokens_per_s")


def read_metrics(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the summary line, the last step line) of ``metrics.jsonl``."""
    summary, last = {}, {}
    for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record.get("event") == "summary":
            summary = record
        elif "tokens_per_s" in record:
            last = record
    return summary, last


def estimated_peak(run_dir: Path) -> tuple[int, float]:
    """(trainable parameters, estimated peak bytes of one step) of the run as resolved in its config.yaml."""
    from slimtune.memory.plan import transient_bytes
    from slimtune.train.config import read_yaml, run_config_from_dict
    from slimtune.train.fit import architecture_of, estimate_for, step_bytes

    cfg = run_config_from_dict(read_yaml(run_dir / "config.yaml"))
    arch = architecture_of(cfg.model.name)
    t = cfg.train
    e = estimate_for(cfg, arch, t.batch_size, t.grad_checkpointing, "cpu")
    peak = step_bytes(cfg, arch, t.batch_size, t.grad_checkpointing, "cpu")
    return e.trainable_params, peak + transient_bytes(arch, t.batch_size, cfg.data.max_length)


def collect_row(run: "SweepRun", wall_s: float, rss_bytes: int) -> dict[str, Any]:
    """The finished run's row, written to ``result.json`` last (atomically): from then on it counts as done."""
    from slimtune.files.write import atomic_write
    from slimtune.sweep.runner import RESULT

    summary, last = read_metrics(run.run_dir)
    after = summary.get("after", {})
    trainable, peak = estimated_peak(run.run_dir)
    row = {"run": run.name, **run.combo, "eval_loss": after.get("eval_loss"),
           "accuracy": after.get("eval_accuracy", after.get("eval_exact_match")),
           "trainable_params": trainable, "est_peak_mib": round(peak / MIB, 1),
           "measured_peak_mib": round(rss_bytes / MIB, 1), "wall_s": round(wall_s, 1),
           "tokens_per_s": round(last["tokens_per_s"], 1) if last else None}
    atomic_write(run.run_dir / RESULT, lambda tmp: Path(tmp).write_text(json.dumps(row, indent=1), encoding="utf-8"))
    return row


def best_index(rows: Sequence[dict[str, Any]]) -> int | None:
    """The best row: lowest eval loss; without eval losses, highest accuracy; None without either."""
    losses = [(r["eval_loss"], i) for i, r in enumerate(rows) if r.get("eval_loss") is not None]
    if losses:
        return min(losses)[1]
    accs = [(-r["accuracy"], i) for i, r in enumerate(rows) if r.get("accuracy") is not None]
    return min(accs)[1] if accs else None


def _cell(column: str, v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and column in METRICS:
        return f"{v:.4f}" if column in ("eval_loss", "accuracy") else f"{v:,.1f}"
    return f"{v:,}" if isinstance(v, int) and column in METRICS else str(v)


def results_markdown(axes: Sequence[Axis], rows: Sequence[dict[str, Any]]) -> str:
    """The table, best run marked ``**best**``, with a line saying what the columns measure."""
    best = best_index(rows)
    cols = ["run", *(a.key for a in axes), *METRICS]
    lines = ["| " + " | ".join(cols) + " | best |", "|" + "---|" * (len(cols) + 1)]
    for i, r in enumerate(rows):
        lines.append("| " + " | ".join(_cell(c, r.get(c)).replace("|", "\\|") for c in cols)
                     + f" | {'**best**' if i == best else ''} |")
    lines += ["", "accuracy: eval_accuracy (classification) or exact match of the held-out answers; est_peak_mib: "
              "slimtune.memory's estimate of one step's tensors; measured_peak_mib: the run process's peak resident "
              "memory (ru_maxrss: Python, torch, tokenizer, data and the step); tokens_per_s: training tokens per "
              "second of the loop."]
    return "\n".join(lines) + "\n"


def results_csv(axes: Sequence[Axis], rows: Sequence[dict[str, Any]]) -> str:
    """The same table as CSV (empty cells for missing values, ``best`` = 1 on the best row)."""
    best = best_index(rows)
    cols = ["run", *(a.key for a in axes), *METRICS]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([*cols, "best"])
    for i, r in enumerate(rows):
        w.writerow([*("" if r.get(c) is None else r.get(c) for c in cols), int(i == best)])
    return buf.getvalue()


def write_results(sweep_dir: Path, axes: Sequence[Axis], rows: Sequence[dict[str, Any]]) -> list[Path]:
    """results.md, results.csv and results.png in ``sweep_dir``, each written atomically."""
    from slimtune.files.write import atomic_write
    from slimtune.sweep.plot import plot_sweep

    out = []
    for name, text in (("results.md", results_markdown(axes, rows)), ("results.csv", results_csv(axes, rows))):
        atomic_write(sweep_dir / name, lambda tmp, text=text: Path(tmp).write_text(text, encoding="utf-8"))
        out.append(sweep_dir / name)
    fig = plot_sweep(axes, rows, best_index(rows))
    atomic_write(sweep_dir / "results.png", lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    out.append(sweep_dir / "results.png")
    return out
