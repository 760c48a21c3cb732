"""``slimtune sweep``: a thin command over :func:`slimtune.sweep.runner.run_sweep` (torch only inside runs)."""

from __future__ import annotations

import typer

from slimtune.cli_errors import run_or_exit_2


def sweep_command(
    config: str = typer.Argument(..., help="the run config (YAML) every run starts from"),
    grid: list[str] = typer.Option(..., "--grid", help="key.path=v1,v2,...; more axes may follow as arguments: "
                                   "--grid adapter.r=4,8 train.lr=1e-4,3e-4; brackets hold a list value: "
                                   "adapter.target_modules=\\[q_proj,v_proj],all-linear"),
    axes: list[str] = typer.Argument(None, help="more axes (key.path=v1,v2,...)"),
    budget_steps: int = typer.Option(None, "--budget-steps", min=1, help="train.max_steps of every run (a short "
                                     "search; the best is then trained in full)"),
) -> None:
    """Train every combination of a grid (output_dir/sweep/<run>/), then write results.md, .csv and a plot.
    A killed sweep run again skips finished runs and resumes the interrupted one."""
    from slimtune.sweep.grid import GridError, parse_grid
    from slimtune.sweep.runner import SweepError, run_sweep
    from slimtune.train.config import RunConfigError
    from slimtune.train.model import ModelLoadError

    errors = (GridError, SweepError, RunConfigError, ModelLoadError, FileNotFoundError)
    parsed = run_or_exit_2(lambda: parse_grid([*grid, *(axes or ())]), errors)
    result = run_or_exit_2(lambda: run_sweep(config, parsed, budget_steps, log=typer.echo), errors)
    if result.rows:
        typer.echo((result.sweep_dir / "results.md").read_text(encoding="utf-8"))
        typer.echo(f"results: {result.sweep_dir / 'results.md'}, results.csv, results.png")
    if result.failed:
        for line in result.failed:
            typer.echo(f"error: run {line}", err=True)
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add ``sweep`` to ``app``."""
    app.command("sweep")(sweep_command)
