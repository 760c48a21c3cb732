"""``slimtune serve`` and ``slimtune blend``: thin commands over slimtune.serve. Wire in with ``register(app)``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from slimtune.cli_errors import run_or_exit_2

DEFAULT_HOST = "127.0.0.1"  # never all interfaces unless asked


def build_server(base: str, adapters: str, *, dtype: str = "float32", quantize: str | None = None,
                 max_batch: int = 32, max_loaded: int | None = None, api_key: str | None = None,
                 limits: Any = None) -> Any:
    """The FastAPI app serving ``base`` (as in ``slimtune train``: bundled name, HF folder, .gguf) with every
    adapter folder under ``adapters``. Raises ModelLoadError / FileNotFoundError / ValueError naming the flag."""
    from slimtune.serve.api import Limits
    from slimtune.serve.app import create_app
    from slimtune.serve.model import MultiAdapterModel
    from slimtune.serve.registry import AdapterRegistry
    from slimtune.train.model import DTYPES, load_model, load_tokenizer

    if quantize not in (None, "nf4"):
        raise ValueError(f"--quantize={quantize!r}: must be nf4 (or leave it out)")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype={dtype!r}: must be one of {', '.join(DTYPES)}")
    if not Path(adapters).is_dir():
        raise FileNotFoundError(f"--adapters={adapters!r}: no such folder")
    tokenizer = load_tokenizer(base)
    model = load_model(base, dtype)
    if quantize == "nf4":
        from slimtune.quant.convert import quantize_model

        quantize_model(model, compute_dtype=DTYPES[dtype])
    served = MultiAdapterModel(model, tokenizer)
    registry = AdapterRegistry(served, adapters, max_loaded)
    base_id = base if "/" not in base and not base.endswith(".gguf") else Path(base).stem
    return create_app(served, registry, base_id, max_batch, limits or Limits(), api_key)


def serve_command(
    base: str = typer.Option("smollm2-135m", "--base", help="the base model: smollm2-135m (bundled), a Hugging "
                             "Face folder or a .gguf file"),
    adapters: str = typer.Option(..., "--adapters", help="a folder whose subfolders are adapters, served under "
                                 "their folder names; lora_path in load requests is relative to it"),
    host: str = typer.Option(DEFAULT_HOST, help="address to bind (127.0.0.1: this machine only)"),
    port: int = typer.Option(8000, min=0, max=65535),
    max_batch: int = typer.Option(32, "--max-batch", min=1, help="rows decoded together: more = more throughput, "
                                  "more memory"),
    max_loaded: int = typer.Option(None, "--max-loaded", min=1, help="adapters kept loaded at once (LRU; evicted "
                                   "ones reload from disk on demand); default: all"),
    api_key: str = typer.Option(None, "--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes"),
    quantize: str = typer.Option(None, "--quantize", help="nf4: serve a 4-bit base (adapters trained on one)"),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16"),
) -> None:
    """Serve a base model and many LoRA adapters, mixed in one batch, behind an OpenAI-compatible API."""
    import uvicorn

    from slimtune.files import AdapterFileError
    from slimtune.train.model import ModelLoadError

    app = run_or_exit_2(lambda: build_server(base, adapters, dtype=dtype, quantize=quantize, max_batch=max_batch,
                                             max_loaded=max_loaded, api_key=api_key),
                        (ValueError, FileNotFoundError, ModelLoadError, AdapterFileError))
    typer.echo(f"serving {base} with adapters {', '.join(app.state.registry.names()) or '(none yet)'} on "
               f"http://{host}:{port}/v1")
    uvicorn.run(app, host=host, port=port, log_level="warning")


def blend_command(
    parts: list[str] = typer.Argument(..., help="ADAPTER=WEIGHT pairs, e.g. runs/a/adapter=0.7 runs/b/adapter=0.3"),
    out: str = typer.Option(..., "-o", "--out", help="folder to write the blended adapter to"),
    rank: int = typer.Option(None, "--rank", help="truncate each module to this rank by SVD (default: exact, the "
                             "ranks concatenated); the approximation error is printed"),
) -> None:
    """Blend LoRA adapters into one: exactly sum w_i * B_i A_i, or its best rank-k approximation."""
    from slimtune.files import AdapterFileError
    from slimtune.serve.blend import blend, parse_parts

    report = run_or_exit_2(lambda: blend(parse_parts(parts), out, rank), (ValueError, AdapterFileError))
    typer.echo(str(report))


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)
    app.command("blend")(blend_command)
