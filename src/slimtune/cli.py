"""The ``slimtune`` command: thin subcommands, each calling one library function.

torch is imported only inside the commands that need it, so ``slimtune --help`` and the memory
estimator start instantly.
"""

from __future__ import annotations

from pathlib import Path

import typer

from slimtune.memory.commands import register as register_memory_commands

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Fine-tune large models on small hardware: LoRA, QLoRA and friends.")


@app.command()
def demo(
    steps: int = typer.Option(30, min=1, help="training steps (about 2-3 s each on a 2-core CPU)"),
    rank: int = typer.Option(8, min=1, help="LoRA rank r: higher = more capacity, more memory"),
    alpha: float = typer.Option(16.0, help="LoRA alpha; the update is scaled by alpha / r"),
    lr: float = typer.Option(1e-3, help="AdamW learning rate for the adapter"),
    batch: int = typer.Option(8, min=1), seq: int = typer.Option(64, min=8),
    out: Path = typer.Option(Path("runs/demo"), help="where the adapter folder is written"),
) -> None:
    """LoRA on the real SmolLM2-135M, trained on Shakespeare: report, loss, generations, adapter file."""
    from slimtune.demo import run_demo

    run_demo(steps=steps, rank=rank, alpha=alpha, lr=lr, batch=batch, seq=seq, out_dir=out)


@app.command()
def inspect(
    targets: str = typer.Option("all-linear", help="comma-separated module names, a regex, or all-linear"),
    rank: int = typer.Option(8, min=1), alpha: float = typer.Option(16.0),
) -> None:
    """Show what LoRA would wrap in SmolLM2-135M and how many parameters would train."""
    import slimtune
    from slimtune.assets import load_smollm2

    model, _ = load_smollm2()
    spec = targets if targets == "all-linear" or "," not in targets and any(c in targets for c in "*[(|\\") \
        else tuple(t.strip() for t in targets.split(","))
    typer.echo(str(slimtune.inject(model, slimtune.LoraConfig(r=rank, alpha=alpha, target_modules=spec))))


@app.command()
def version() -> None:
    """Print slimtune's version."""
    from slimtune.version import __version__

    typer.echo(__version__)


register_memory_commands(app)  # estimate, plan


def main() -> None:  # pragma: no cover - console entry point
    app()
