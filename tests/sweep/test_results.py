"""The results table (markdown, CSV), the best run, and the plot, from hand-written rows."""

from __future__ import annotations

import csv
import io

from slimtune.sweep.grid import parse_grid
from slimtune.sweep.results import best_index, results_csv, results_markdown, write_results

AXES = parse_grid(["adapter.r=4,16", "train.lr=3e-4,1e-3"])


def rows(losses=(2.1, 1.9, 2.3, 2.0), acc=(None,) * 4):
    out = []
    for i, (r, lr) in enumerate([("4", "3e-4"), ("4", "1e-3"), ("16", "3e-4"), ("16", "1e-3")]):
        out.append({"run": f"00{i + 1}", "adapter.r": r, "train.lr": lr, "eval_loss": losses[i], "accuracy": acc[i],
                    "trainable_params": 1000 * (i + 1), "est_peak_mib": 900.5, "measured_peak_mib": 1500.25,
                    "wall_s": 61.0, "tokens_per_s": 410.3})
    return out


def test_best_is_lowest_loss_else_highest_accuracy():
    assert best_index(rows()) == 1
    assert best_index(rows(losses=(None,) * 4, acc=(0.2, 0.5, 0.9, 0.1))) == 2
    assert best_index(rows(losses=(None,) * 4)) is None


def test_markdown_and_csv_hold_every_grid_value_and_mark_the_best():
    md = results_markdown(AXES, rows()).splitlines()
    assert md[0].startswith("| run | adapter.r | train.lr | eval_loss | accuracy | trainable_params")
    best = [line for line in md if "**best**" in line]
    assert best == ["| 002 | 4 | 1e-3 | 1.9000 | - | 2,000 | 900.5 | 1,500.2 | 61.0 | 410.3 | **best** |"]
    table = list(csv.DictReader(io.StringIO(results_csv(AXES, rows()))))
    assert [t["best"] for t in table] == ["0", "1", "0", "0"]
    assert [(t["adapter.r"], t["train.lr"], float(t["eval_loss"])) for t in table][2] == ("16", "3e-4", 2.3)
    assert table[0]["accuracy"] == ""


def test_write_results_writes_md_csv_and_a_png(tmp_path):
    paths = write_results(tmp_path, AXES, rows())
    assert [p.name for p in paths] == ["results.md", "results.csv", "results.png"]
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_plot_has_a_panel_per_axis_with_every_run_and_the_mean():
    from slimtune.sweep.plot import plot_sweep

    fig = plot_sweep(AXES, rows(), best_index(rows()))
    panels = fig.axes
    assert [ax.get_xlabel() for ax in panels] == ["adapter.r", "train.lr"]
    lr = panels[1]
    assert [t.get_text() for t in lr.get_xticklabels()] == ["3e-4", "1e-3"]
    mean = lr.get_lines()[0].get_ydata()
    assert list(mean) == [(2.1 + 2.3) / 2, (1.9 + 2.0) / 2]
    points = lr.collections[0].get_offsets()
    assert sorted(map(tuple, points.tolist())) == sorted([(0, 2.1), (1, 1.9), (0, 2.3), (1, 2.0)])
