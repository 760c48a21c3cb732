"""The ``slimtune`` command: thin subcommands, each calling one library function.

torch is imported only inside the commands that need it, so ``slimtune --help`` and the memory
estimator start instantly. Bad input (a config file, a flag value, a flag combination) prints one
``error:`` line naming the flag or field and exits 2 (:mod:`slimtune.cli_errors`).
"""

from __future__ import annotations

import os
from pathlib import Path

import typer

from slimtune.cli_errors import exit_2_on_bad_input, run_or_exit_2
from slimtune.export.commands import register as register_export_commands
from slimtune.inspect.commands import register as register_inspect_commands
from slimtune.memory.commands import register as register_memory_commands
from slimtune.serve.commands import register as register_serve_commands
from slimtune.sweep.commands import register as register_sweep_commands

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Fine-tune large models on small hardware: LoRA, QLoRA and friends.")


def target_spec(targets: str) -> str | tuple[str, ...]:
    """``--targets``: ``all-linear``, a regex (no comma, a regex character), or comma-separated names."""
    if targets == "all-linear" or "," not in targets and any(c in targets for c in "*[(|\\"):
        return targets
    return tuple(t.strip() for t in targets.split(","))


@app.command()
@exit_2_on_bad_input
def targets(
    model: str = typer.Argument("smollm2-135m", help="the bundled smollm2-135m or a Hugging Face model folder"),
    targets: str = typer.Option("all-linear", help="comma-separated module names, a regex, or all-linear"),
    rank: int = typer.Option(8, min=1), alpha: float = typer.Option(16.0),
) -> None:
    """Show what LoRA would wrap in a model (default SmolLM2-135M) and how many parameters would train."""
    from slimtune.config import LoraConfig

    cfg = LoraConfig(r=rank, alpha=alpha, target_modules=target_spec(targets))  # checked before the model loads
    import slimtune
    from slimtune.train.model import load_model

    typer.echo(str(slimtune.inject(load_model(model, "float32"), cfg)))


@app.command()
@exit_2_on_bad_input
def validate(
    config: Path = typer.Argument(..., help="a run config (YAML), e.g. configs/train/lora.yaml"),
    overrides: list[str] = typer.Argument(None, help="key.path=value overrides, e.g. train.lr=1e-4 adapter.r=16"),
) -> None:
    """Check a run config for `slimtune train`: every problem at once (exit 2), or a summary of the run."""
    from slimtune.train.config import describe, load_run_config  # no torch: validating is instant

    cfg = load_run_config(config, overrides or (), check_files=True)
    typer.echo(f"{config}: valid")
    typer.echo(describe(cfg))


@app.command(context_settings={"allow_extra_args": False})
def train(
    config: str = typer.Argument(None, help="a run config (YAML), e.g. configs/train/lora.yaml; leave out for the "
                                            "default run (BBC News topics on the bundled SmolLM2). Then overrides"),
    overrides: list[str] = typer.Argument(None, help="key.path=value overrides, e.g. train.lr=1e-4 adapter.r=16"),
    resume: bool = typer.Option(False, "--resume", help="continue from the newest complete checkpoint in "
                                                        "output_dir (bit-identical on CPU to an unbroken run)"),
    nproc: int = typer.Option(1, "--nproc", help="processes on this machine (DDP over torchrun: gloo on CPU, "
                                                 "NCCL with one GPU each); batch_size is per process"),
) -> None:
    """Fine-tune a model on your data from a run config: progress, checkpoints, scores before and after."""
    from slimtune.train.config import describe, load_run_config

    if config is not None and "=" in config and not Path(config).exists():  # `slimtune train train.lr=1e-4`
        overrides, config = [config, *(overrides or ())], None
    cfg = run_or_exit_2(lambda: load_run_config(config, overrides or (), check_files=True))
    if nproc != 1:  # checked above, before any process starts: now the same command in N processes
        from slimtune.train.distributed import torchrun_command

        args = ["train", *([config] if config else []), *(overrides or ()), *(["--resume"] if resume else [])]
        cmd = run_or_exit_2(lambda: torchrun_command(nproc, args))
        os.execv(cmd[0], cmd)
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 prints
    if main_rank:
        typer.echo(describe(cfg))
    from slimtune.train.run import train as run_training

    result = run_or_exit_2(lambda: run_training(cfg, resume=resume, log=typer.echo))
    if main_rank:
        typer.echo(result.summary())


@app.command()
def version() -> None:
    """Print slimtune's version."""
    from slimtune.version import __version__

    typer.echo(__version__)


register_memory_commands(app)  # estimate, plan
register_inspect_commands(app)  # inspect, compress, extract, report
register_export_commands(app)  # export
register_sweep_commands(app)  # sweep
register_serve_commands(app)  # serve, blend


def main() -> None:  # pragma: no cover - console entry point
    app()
