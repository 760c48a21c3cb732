"""``slimtune inspect | compress | extract | report``: thin commands over :mod:`slimtune.inspect`.

Wire into an app with ``register(app)``. torch loads only inside the commands. Bad input (a path, a flag)
raises a named ValueError in the library; :func:`slimtune.cli_errors.exit_2_on_bad_input` turns it into one
``error:`` line and exit status 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from slimtune.cli_errors import exit_2_on_bad_input


def inspect_command(
    adapter: Path = typer.Argument(..., help="an adapter folder (adapter_config.json + adapter_model.safetensors), "
                                             "from slimtune or PEFT"),
    as_json: bool = typer.Option(False, "--json", help="print everything as JSON (for scripts)"),
) -> None:
    """What an adapter learned: method, base, ranks, size, and per module ||dW||_F, stable and effective rank."""
    from slimtune.inspect.adapter import inspect_adapter, table

    stats = inspect_adapter(adapter)
    typer.echo(json.dumps(stats.as_dict(), indent=2) if as_json else table(stats))


def compress_command(
    adapter: Path = typer.Argument(..., help="a LoRA or DoRA adapter folder"),
    out: Path = typer.Option(..., "-o", "--out", help="the new adapter folder (must not exist)"),
    rank: int = typer.Option(None, help="truncate every module to this rank"),
    energy: float = typer.Option(None, help="per module, the smallest rank keeping this share of ||dW||_F^2, "
                                            "e.g. 0.95"),
    base: str = typer.Option(None, help="also measure the logits error on this base model (smollm2-135m or a "
                                        "Hugging Face folder)"),
) -> None:
    """A smaller adapter by truncated SVD of each module's B*A; it still loads in PEFT and slimtune."""
    from slimtune.inspect.compress import check_choice, compress_adapter

    check_choice(rank, energy)  # before reading anything
    result = compress_adapter(adapter, out, rank=rank, energy=energy)
    typer.echo(result.summary())
    if base is not None:
        from slimtune.inspect.outputs import adapter_logit_error

        typer.echo(str(adapter_logit_error(base, adapter, result.out)))


def extract_command(
    base: str = typer.Option(..., help="the base model: smollm2-135m or a Hugging Face folder"),
    tuned: Path = typer.Option(..., help="the fully fine-tuned model (a Hugging Face folder, e.g. a run's model/)"),
    rank: int = typer.Option(..., help="the LoRA rank K"),
    out: Path = typer.Option(..., "-o", "--out", help="the new adapter folder (must not exist)"),
    alpha: float = typer.Option(None, help="LoRA alpha of the adapter (default 2 * rank)"),
) -> None:
    """The best rank-K LoRA of W_tuned - W0 for every linear layer, with the energy it captures."""
    from slimtune.inspect.extract import extract_lora

    typer.echo(extract_lora(base, tuned, rank, out, alpha=alpha).summary())


def report_command(
    target: Path = typer.Argument(..., help="an adapter folder, or a run folder of `slimtune train`"),
    out: Path = typer.Option(..., "-o", "--out", help="the HTML file to write (must not exist)"),
) -> None:
    """One self-contained HTML page: the inspect table, a heatmap, weight histogram, spectra and loss curves."""
    from slimtune.inspect.report import build_report

    typer.echo(f"report written to {build_report(target, out)}")


def register(app: typer.Typer) -> None:
    """Add ``inspect``, ``compress``, ``extract`` and ``report``; bad input exits 2 with one line."""
    app.command("inspect")(exit_2_on_bad_input(inspect_command))
    app.command("compress")(exit_2_on_bad_input(compress_command))
    app.command("extract")(exit_2_on_bad_input(extract_command))
    app.command("report")(exit_2_on_bad_input(report_command))
