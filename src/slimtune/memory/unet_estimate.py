"""``slimtune estimate`` for a diffusers UNet: the four residents of one noise-prediction step (no torch).

Weights, gradients and optimizer state follow :mod:`slimtune.memory.estimate`'s rules over the exact
parameter counts of :mod:`slimtune.memory.unet`; activations come from
:func:`slimtune.memory.unet_activations.saved_unet_activations`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slimtune.memory import formulas as f
from slimtune.memory.estimate import Component, Estimate, gradient_component, optimizer_component, weight_component
from slimtune.memory.spec import Method, Precision
from slimtune.memory.unet import (UNET_ATTENTION, UNetArch, UNetWorkload, lora_targets, read_unet_config,
                                  unet_from_config, unet_lora_params, unet_params)
from slimtune.memory.unet_activations import UNetTraining, saved_unet_activations

UNET_METHODS = ("full", "lora", "dora")


def is_unet_config(source: str | Path) -> bool:
    """Whether ``source`` (a config.json or its folder) is a diffusers UNet2DConditionModel config."""
    try:
        return read_unet_config(source).get("_class_name") == "UNet2DConditionModel"
    except ValueError:
        return False


def unet_trainable(a: UNetArch, method: Method) -> int:
    """Trainable parameters: every one (full); LoRA on the targets (default: to_q, to_k, to_v, to_out.0);
    DoRA adds a magnitude per output feature of each targeted linear and per output channel of each
    targeted conv (``DoraConv``). Raises ValueError for other methods and targets matching nothing."""
    if method.name == "full":
        return unet_params(a)
    targets = method.targets or UNET_ATTENTION
    if method.name == "lora":
        return unet_lora_params(a, method.rank, targets)
    if method.name == "dora":
        return unet_lora_params(a, method.rank, targets) + sum(layer.d_out for layer in lora_targets(a, targets))
    raise ValueError(f"method={method.name!r}: a UNet is estimated for {', '.join(UNET_METHODS)}")


def estimate_unet(model: str | Path | dict[str, Any] | UNetArch, method: Method | str = "lora",
                  precision: Precision | None = None, workload: UNetWorkload | None = None) -> Estimate:
    """Estimate one training step of a UNet2DConditionModel (a config.json path or folder, its dict, or a
    UNetArch). Raises ValueError naming the field for an unsupported config, method or precision."""
    method = Method(method) if isinstance(method, str) else method
    precision, workload = precision or Precision(), workload or UNetWorkload()
    a = model if isinstance(model, UNetArch) else unet_from_config(model)
    if precision.base_dtype(method.name) in f.QUANT_DTYPES:
        raise ValueError(f"precision.weight_dtype={precision.base_dtype(method.name)!r}: a UNet is estimated "
                         "with a float base (fp32, bf16, fp16)")
    trainable, total = unet_trainable(a, method), unet_params(a)
    t = UNetTraining(full=method.name == "full", lora_targets=method.targets or UNET_ATTENTION,
                     lora_rank=method.rank, bpe=f.DTYPE_BYTES[precision.compute_dtype(method.name)],
                     adapter_bpe=f.DTYPE_BYTES[precision.trainable_dtype(method.name)], dora=method.name == "dora")
    act = saved_unet_activations(a, t, workload)
    rule = (f"UNet graph, b={workload.batch} latent {workload.resolution}x{workload.resolution}, "
            f"{workload.text_tokens} text tokens, {precision.compute_dtype(method.name)}")
    components = (weight_component(total, method, precision, trainable),
                  gradient_component(method, precision, trainable),
                  optimizer_component(method, precision, trainable),
                  Component("activations", act, rule))
    return Estimate(a.name, method, precision, workload, total, trainable, components)  # type: ignore[arg-type]


def unet_table(e: Estimate) -> str:
    """One UNet estimate: a row per component with GB, GiB and its rule, then the total."""
    w = e.workload
    lines = [f"{e.model}: {e.method.name}, {e.total_params:,} params, {e.trainable_params:,} trainable "
             f"({100 * e.trainable_params / max(e.total_params, 1):.4g}%), batch {w.batch} x latent "
             f"{w.resolution}x{w.resolution}, {w.text_tokens} text tokens",
             f"{'component':<12}{'GB':>13}{'GiB':>13}  rule"]
    for c in e.components:
        lines.append(f"{c.name:<12}{f.gb(c.bytes):10.2f} GB {f.gib(c.bytes):9.2f} GiB  {c.rule}")
    lines.append(f"{'total':<12}{f.gb(e.total):10.2f} GB {f.gib(e.total):9.2f} GiB")
    return "\n".join(lines)


def unet_estimates(model: str | Path, methods: tuple[str, ...], method: Method, precision: Precision,
                   workload: UNetWorkload) -> list[Estimate]:
    """:func:`estimate_unet` for each method name, sharing ``method``'s rank and targets."""
    out = []
    for name in methods:
        m = Method(name, method.rank, method.targets if name != "full" else None)
        out.append(estimate_unet(model, m, precision, workload))
    return out


def unet_command(model: str, methods: tuple[str, ...], method: Method, precision: Precision, batch: int,
                 resolution: int, text_tokens: int, as_json: bool, measure: bool,
                 unused: dict[str, bool] | None = None) -> str:
    """What ``slimtune estimate --model unet/config.json`` prints: a table per method (or JSON bytes), and
    with ``measure`` the same step measured here. ``unused``: flag -> given, for language-model flags a UNet
    estimate does not read (refused, not ignored). Raises ValueError naming the bad flag or field."""
    from slimtune.memory.render import measured_table

    given = [flag for flag, on in (unused or {}).items() if on]
    if given:
        raise ValueError(f"{given[0]}: not used for a diffusers UNet config (its options: --method/--compare, --rank, "
                         "--targets, --batch, --resolution, --text-tokens, dtypes, --json, --measure)")

    workload = UNetWorkload(batch, resolution, text_tokens)
    estimates = unet_estimates(model, methods, method, precision, workload)
    if as_json:
        data = {e.method.name: e.as_dict() for e in estimates}
        return json.dumps(data[methods[0]] if len(methods) == 1 else data, indent=2)
    out = "\n\n".join(unet_table(e) for e in estimates)
    if measure:
        from slimtune.memory.unet_measure import measure_unet_against_estimate

        est, meas = measure_unet_against_estimate(model, method, precision, workload)
        rows = [(k, est.as_dict()[k], meas.as_dict()[k]) for k in ("weights", "gradients", "optimizer",
                                                                    "activations", "total")]
        out += f"\n\nmeasured on {meas.device}, {precision.compute_dtype(method.name)}:\n{measured_table(rows)}"
    return out
