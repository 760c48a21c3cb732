"""``slimtune report``: one self-contained HTML file (figures inlined as PNG) for an adapter or a run folder.

An adapter folder gives the inspect summary and table, the ||dW|| heatmap, the weight histogram and the
spectra; a run folder (``slimtune train``'s output_dir) adds the loss curves from ``metrics.jsonl`` and
analyses its ``adapter/`` (a full or freeze run's ``model/`` has no adapter: curves only). The file needs no
network: no script, no external stylesheet, no font or image URL.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from slimtune.files import CONFIG_NAME, read_folder
from slimtune.files.write import atomic_write
from slimtune.inspect import plots
from slimtune.inspect.adapter import (
    TABLE_COLUMNS, AdapterStats, all_weights, inspect_adapter, summary_lines, table_rows,
)
from slimtune.inspect.folders import OutputExistsError
from slimtune.version import __version__

METRICS = "metrics.jsonl"

CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222}h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.8em;border-bottom:1px solid #ddd}
pre{background:#f6f8fa;padding:.8em;border-radius:6px;overflow-x:auto}figure{margin:1em 0}img{max-width:100%}
figcaption{color:#555;font-size:.9em}table{border-collapse:collapse;font-size:.85em}
th,td{padding:2px 8px;border-bottom:1px solid #eee;text-align:right}th{background:#f0f0f0;position:sticky;top:0}
td:first-child,th:first-child{text-align:left;font-family:ui-monospace,monospace}.note{color:#555}"""


class ReportError(ValueError):
    """Bad report input: names the path and what was expected."""


def build_report(target: str | Path, out: str | Path) -> Path:
    """Write the HTML report for ``target`` (an adapter folder or a run folder) to the new file ``out``.

    Raises ReportError for a target that is neither, OutputExistsError for an existing ``out``,
    AdapterFileError for a malformed adapter folder. The file is written to a temp name and renamed.
    """
    target, out = Path(target), Path(out)
    if out.exists():
        raise OutputExistsError(f"out={str(out)!r}: already exists; choose a new file name")
    adapter, records, note = _sources(target)
    sections = [f"<h1>slimtune report: {html.escape(target.name or str(target))}</h1>",
                f"<p class=note>{html.escape(str(target))} &middot; slimtune {html.escape(__version__)}</p>"]
    if note:
        sections.append(f"<p class=note>{html.escape(note)}</p>")
    if records is not None:
        sections.append("<h2>Training</h2>" + _figure(plots.loss_curves(records), "Train loss at every logged "
                        "step and eval loss where the run evaluated (metrics.jsonl)."))
    if adapter is not None:
        sections += adapter_sections(adapter)
    page = (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>slimtune report: "
            f"{html.escape(target.name)}</title><style>{CSS}</style></head><body>{''.join(sections)}</body></html>")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    return out


def _sources(target: Path) -> tuple[Path | None, list[dict] | None, str | None]:
    """(adapter folder or None, metrics records or None, a note) for an adapter or run folder."""
    if (target / CONFIG_NAME).is_file():
        return target, None, None
    if (target / METRICS).is_file() or (target / "adapter").is_dir():
        records = read_metrics(target / METRICS) if (target / METRICS).is_file() else None
        if (target / "adapter" / CONFIG_NAME).is_file():
            return target / "adapter", records, None
        note = "this run trained the model itself (model/): no adapter to analyse" \
            if (target / "model").is_dir() else "no adapter/ in this run folder (not finished?)"
        return None, records, note
    raise ReportError(f"{str(target)!r}: neither an adapter folder (with {CONFIG_NAME}) nor a run folder of "
                      f"`slimtune train` (with {METRICS} or adapter/)")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of ``metrics.jsonl``, one a line; a line that is not one (a run killed mid-write) is
    skipped. Raises ReportError for a file that is not UTF-8."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ReportError(f"{path}: not UTF-8 text (byte {e.start})") from None
    out = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            out.append(record)
    return out


def adapter_sections(folder: Path) -> list[str]:
    """The HTML of an adapter's part of the report: summary, figures, table."""
    stats = inspect_adapter(folder)
    parts = ["<h2>Adapter</h2><pre>" + html.escape("\n".join(summary_lines(stats))) + "</pre>"]
    if not stats.modules:
        parts.append(f"<p class=note>{html.escape(stats.method)} adapters are not low-rank weight updates: "
                     "no per-module dW to analyse.</p>")
        return parts
    parts.append(_figure(plots.norm_heatmap(stats.modules), "||dW||_F = ||s B A||_F per module: which blocks "
                         "and which projections the fine-tune changed most."))
    parts.append(_figure(plots.weight_histogram({k: v.numpy() for k, v in all_weights(read_folder(folder)).items()}),
                         "Distribution of |w| over every lora_A and lora_B entry (log-spaced bins)."))
    parts.append(_figure(plots.spectra_figure(stats.modules), "Normalised singular values of each module's dW; "
                         "vertical lines: the median rank keeping 90/95/99% of ||dW||_F^2. A fast drop means the "
                         "update needs fewer ranks than it was given (see slimtune compress)."))
    parts.append("<h2>Per module (largest ||dW||_F first)</h2>" + _table(stats))
    return parts


def _table(stats: AdapterStats) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in TABLE_COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table_rows(stats))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(fig: Any, caption: str) -> str:
    data = base64.b64encode(plots.png_bytes(fig)).decode("ascii")
    return (f"<figure><img alt=\"{html.escape(caption)}\" src=\"data:image/png;base64,{data}\">"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")
