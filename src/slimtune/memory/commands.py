"""``slimtune estimate`` and ``slimtune plan``: thin commands over the library (torch only for --measure).

Wire into an app with ``register(app)``. Bad input raises ValueError in the library (or in
:func:`check_flags` for flag combinations); :func:`slimtune.cli_errors.exit_2_on_bad_input` turns it
into one ``error:`` line and exit status 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from slimtune.cli_errors import exit_2_on_bad_input
from slimtune.vocab import ALIASES, METHODS


def _split(flag: str, text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    parts = tuple(t.strip() for t in text.split(",") if t.strip())
    if not parts:
        raise ValueError(f"{flag}={text!r}: give comma-separated names")
    return parts


def check_flags(model: str | None, params: float | None, method: str | None, compare: str | None,
                measure: bool, as_json: bool) -> None:
    """Refuse flag combinations where one flag would be ignored. Raises ValueError naming the flags."""
    if (model is None) == (params is None):
        raise ValueError("give exactly one of --model (preset or config.json) and --params")
    if method is not None and compare is not None:
        raise ValueError(f"--method={method!r} with --compare={compare!r}: give one; --compare lists every "
                         "method to estimate")
    if measure and (compare is not None or as_json or params is not None):
        other = "--compare" if compare is not None else "--json" if as_json else "--params"
        raise ValueError(f"--measure with {other}: --measure trains one method (--method) of a --model and prints "
                         "a table")


def estimate_command(
    model: str = typer.Option(None, "--model", help="a preset (llama-2-7b, llama-3-8b, smollm2-135m, ...) or a "
                              "config.json path (file or folder)"),
    params: float = typer.Option(None, "--params", help="a bare parameter count such as 7e9 (no activations)"),
    method: str = typer.Option(None, help=f"one of {', '.join(METHODS)} (default full; also accepted: "
                               f"{', '.join(ALIASES)})"),
    compare: str = typer.Option(None, help="methods side by side, e.g. full,lora,qlora (instead of --method)"),
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
    rank: int = typer.Option(None, min=1, help="lora/qlora/dora rank (default 8): higher = more capacity, "
                             "more memory"),
    targets: str = typer.Option(None, help="lora/qlora/dora: comma-separated module names, or all-linear "
                                "(default: q,v)"),
    trainable_layers: int = typer.Option(None, min=1, help="freeze: how many last blocks train (default 2)"),
    adapter_dim: int = typer.Option(None, min=1, help="bottleneck: adapter width (default 64)"),
    prompt_tokens: int = typer.Option(None, min=1, help="prompt: soft-prompt length (default 20)"),
    trainable: int = typer.Option(None, min=0, help="trainable parameters of the methods but full (needed with "
                                  "--params)"),
    as_json: bool = typer.Option(False, "--json", help="print bytes as JSON"),
    plot: Path = typer.Option(None, help="write stacked bars per method to this PNG"),
    measure: bool = typer.Option(False, "--measure", help="also run real training steps here and compare"),
    resolution: int = typer.Option(64, min=1, help="a diffusers UNet config: the latent side (image side / 8)"),
    text_tokens: int = typer.Option(77, min=1, help="a diffusers UNet config: caption embeddings per image"),
) -> None:
    """How much memory fine-tuning takes: weights, gradients, optimizer state, activations."""
    from slimtune.memory import estimate as est
    from slimtune.memory import render
    from slimtune.memory.spec import Method, Precision, Workload, check_options

    check_flags(model, params, method, compare, measure, as_json)
    ref = model if model is not None else params
    methods = _split("--compare", compare) or (method or "full",)
    options = dict(rank=rank, targets=_split("--targets", targets), trainable_layers=trainable_layers,
                   adapter_dim=adapter_dim, prompt_tokens=prompt_tokens)
    given = {k: v for k, v in options.items() if v is not None}
    check_options(methods, given)  # e.g. --rank with full: refused, not ignored
    m = Method(methods[0], **given)
    p = Precision(weight_dtype, grad_dtype, optimizer, optim_dtype, master_weights, adapter_dtype=adapter_dtype)
    from slimtune.memory.unet_estimate import is_unet_config, unet_command

    if model is not None and is_unet_config(model):  # a diffusers UNet2DConditionModel config.json
        unused = {"--seq": seq != 512, "--grad-checkpointing": grad_checkpointing, "--attention": attention != "sdpa",
                  "--plot": plot is not None, "--trainable": trainable is not None}
        typer.echo(unet_command(model, methods, m, p, batch, resolution, text_tokens, as_json, measure, unused))
        return
    w = Workload(batch, seq, grad_checkpointing, attention)
    estimates = est.compare(ref, methods, m, p, w, trainable)
    if as_json:
        out = {e.method.name: e.as_dict() for e in estimates}  # keyed by the canonical names
        typer.echo(json.dumps(estimates[0].as_dict() if compare is None else out, indent=2))
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

    est, meas = measure_against_estimate(ref, method, precision, workload)
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

    typer.echo(plan_table(plan(model, gpu_bytes(gpu), seq, _split("--targets", targets)), gpu))


def register(app: typer.Typer) -> None:
    """Add ``estimate`` and ``plan`` to ``app``; bad input exits 2 with one line (no traceback)."""
    app.command("estimate")(exit_2_on_bad_input(estimate_command))
    app.command("plan")(exit_2_on_bad_input(plan_command))
