"""``slimtune export``: a thin command over :func:`slimtune.export.export`. Wire in with ``register(app)``.

Bad input (a source, base, format, dtype or output path) prints one ``error:`` line and exits 2; torch and
the export package load only when the command runs.
"""

from __future__ import annotations

from pathlib import Path

import typer

from slimtune.cli_errors import run_or_exit_2


def bad_input_errors() -> tuple[type[BaseException], ...]:
    """The named errors an export raises for bad input (their modules import torch: loaded on use)."""
    from slimtune.export.errors import ExportError
    from slimtune.files import AdapterFileError
    from slimtune.fingerprint import BaseModelMismatch
    from slimtune.train.config import RunConfigError
    from slimtune.train.model import ModelLoadError

    return (ExportError, AdapterFileError, BaseModelMismatch, ModelLoadError, RunConfigError, FileNotFoundError)


def export_command(
    source: Path = typer.Argument(..., help="a `slimtune train` run folder, an adapter folder or a model folder"),
    out: Path = typer.Option(..., "-o", "--output", help="the .gguf file or the Hugging Face folder to write"),
    base: str = typer.Option(None, help="the base model: smollm2-135m, a Hugging Face folder or a .gguf file "
                             "(default: the run's model.name, or the adapter's base_model_name_or_path)"),
    fmt: str = typer.Option("gguf", "--format", help="hf (a plain Hugging Face folder), gguf (merged model for "
                            "llama.cpp / Ollama) or gguf-lora (the adapter alone, llama.cpp's --lora)"),
    dtype: str = typer.Option(None, help="hf: f32|f16|bf16 (default f32); gguf: f32|f16|bf16|q8_0|q4_0 "
                              "(default f16; smaller = more rounding); gguf-lora: f32|f16|bf16|q8_0 (default f32)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output (once the new one is "
                                   "complete)"),
) -> None:
    """Export a fine-tune: merged into its base as a Hugging Face folder or a GGUF file, or the adapter as GGUF."""
    from slimtune.export.api import export

    result = run_or_exit_2(lambda: export(source, out, base=base, fmt=fmt, dtype=dtype, overwrite=overwrite),
                           bad_input_errors())
    typer.echo(result.summary())


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)
