"""``slimtune estimate`` and ``slimtune plan``: thin commands over the library (torch only for --measure).

Wire into an app with ``register(app)``.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from slimtune.memory.spec import METHODS


def _split(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    parts = tuple(t.strip() for t in text.split(",") if t.strip())
    if not parts:
        raise typer.BadParameter(f"{text!r}: give comma-separated names")
    return parts


def _fail(err: Exception) -> None:
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(2)


def estimate_command(
    model: str = typer.Option(None, "--model", help="a preset (llama-2-7b, llama-3-8b, smollm2-135m, ...) or a "
                              "config.json path (file or folder)"),
    params: float = typer.Option(None, "--params", help="a bare parameter count such as 7e9 (no activations)"),
    method: str = typer.Option("full", help=f"one of {', '.join(METHODS)}"),
    compare: str = typer.Option(None, help="methods side by side, e.g. full,lora,qlora"),
    weight_dtype: str = typer.Option(None, help="fp32, bf16, fp16, int8 or nf4 (default: bf16; nf4 for qlora)"),
    grad_dtype: str = typer.Option(None, help="fp32, bf16 or fp16 (default: the trainable weights' dtype)"),
    optimizer: str = typer.Option("adamw", help="adamw, adamw-8bit, sgd or none"),
    optim_dtype: str = typer.Option("fp32", help="dtype of the optimizer moments: fp32, bf16 or fp16"),
    master_weights: bool = typer.Option(False, "--master-weights", help="add an fp32 copy of trainable weights"),
    adapter_dtype: str = typer.Option("float32", help="LoRA/DoRA/adapter parameters on a 16-bit or 4-bit base: "
                                      "float32 (default, as created) or base (the compute dtype)"),
    batch: int = typer.Option(1, min=1), seq: int = typer.Option(512, min=1),
    grad_checkpointing: bool = typer.Option(False, "--grad-checkpointing", help="keep only block inputs"),
    attention: str = typer.Option("sdpa", help="sdpa (fused, no s^2 term) or eager"),
    rank: int = typer.Option(8, min=1, help="LoRA/DoRA rank: higher = more capacity, more memory"),
    targets: str = typer.Option(None, help="comma-separated module names, or all-linear (default: q,v)"),
    trainable_layers: int = typer.Option(2, min=1, help="freeze: how many last blocks train"),
    adapter_dim: int = typer.Option(64, min=1, help="adapter: bottleneck width"),
    prompt_tokens: int = typer.Option(20, min=1, help="prompt-tuning: soft-prompt length"),
    trainable: int = typer.Option(None, min=0, help="trainable parameters, for PEFT methods with --params"),
    as_json: bool = typer.Option(False, "--json", help="print bytes as JSON"),
    plot: Path = typer.Option(None, help="write stacked bars per method to this PNG"),
    measure: bool = typer.Option(False, "--measure", help="also run real training steps here and compare"),
) -> None:
    """How much memory fine-tuning takes: weights, gradients, optimizer state, activations."""
    from slimtune.memory import estimate as est
    from slimtune.memory import render
    from slimtune.memory.spec import Method, Precision, Workload

    if (model is None) == (params is None):
        _fail(ValueError("give exactly one of --model (preset or config.json) and --params"))
    try:
        ref = model if model is not None else params
        m = Method(method, rank, _split(targets), trainable_layers, adapter_dim, prompt_tokens)
        p = Precision(weight_dtype, grad_dtype, optimizer, optim_dtype, master_weights, adapter_dtype=adapter_dtype)
        w = Workload(batch, seq, grad_checkpointing, attention)
        methods = _split(compare) or (method,)
        estimates = est.compare(ref, methods, m, p, w, trainable)
    except ValueError as err:
        _fail(err)
    if as_json:
        out = [e.as_dict() for e in estimates]
        typer.echo(json.dumps(out[0] if len(out) == 1 else dict(zip(methods, out)), indent=2))
    elif compare:
        typer.echo(render.compare_table(estimates))
    else:
        typer.echo(render.estimate_table(estimates[0]))
        breakdown = render.lora_breakdown(ref, estimates[0])
        if breakdown:
            typer.echo(breakdown)
    if plot is not None:
        from slimtune.memory.plot import plot_components

        typer.echo(f"plot written to {plot_components(estimates, plot)}", err=as_json)
    if measure:
        _measure(ref, m, p, w)


def _measure(ref: object, method, precision, workload) -> None:
    from slimtune.memory import render
    from slimtune.memory.compare import measure_against_estimate

    try:
        est, meas = measure_against_estimate(ref, method, precision, workload)
    except ValueError as err:
        _fail(err)
    rows = [(k, est.as_dict()[k], meas.as_dict()[k]) for k in ("weights", "gradients", "optimizer",
                                                                "activations", "total")]
    typer.echo(f"\nmeasured on {meas.device}, {est.precision.compute_dtype(method.name)}:")
    typer.echo(render.measured_table(rows))
    if meas.cuda_peak is not None:
        typer.echo(f"torch.cuda.max_memory_allocated: {meas.cuda_peak / 2**20:.1f} MiB")


def plan_command(
    gpu: str = typer.Option(..., help="a size (24GB = 24e9 bytes, 24GiB) or a card: t4, l4, rtx-3090, rtx-4090, "
                            "a100-40gb, a100-80gb, h100-80gb"),
    model: str = typer.Option(..., help="a preset or a config.json path"),
    seq: int = typer.Option(2048, min=1),
    targets: str = typer.Option("all-linear", help="LoRA targets: comma-separated names, or all-linear"),
) -> None:
    """What fits a GPU: recipes ranked, with headroom, or a plain 'nothing fits'."""
    from slimtune.memory.plan import plan, plan_table
    from slimtune.memory.presets import gpu_bytes

    try:
        result = plan(model, gpu_bytes(gpu), seq, _split(targets))
    except ValueError as err:
        _fail(err)
    typer.echo(plan_table(result, gpu))


def register(app: typer.Typer) -> None:
    """Add ``estimate`` and ``plan`` to ``app``."""
    app.command("estimate")(estimate_command)
    app.command("plan")(plan_command)
