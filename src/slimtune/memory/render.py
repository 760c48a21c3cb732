"""Plain-text tables for estimates, comparisons, measurements and plans (no torch)."""

from __future__ import annotations

from typing import Sequence

from slimtune.memory.arch import Architecture, lora_params, targeted_linears
from slimtune.memory.estimate import COMPONENTS, Estimate, resolve_model, targets_for
from slimtune.memory.formulas import gb, gib


def _size(n: float) -> str:
    return f"{gb(n):10.2f} GB {gib(n):9.2f} GiB"


def estimate_table(e: Estimate) -> str:
    """One estimate: a row per component with GB, GiB and the rule behind it, then the total."""
    w = e.workload
    head = (f"{e.model}: {e.method.name}, {e.total_params:,} params, {e.trainable_params:,} trainable "
            f"({100 * e.trainable_params / max(e.total_params, 1):.4g}%), batch {w.batch} x seq {w.seq}"
            f"{', gradient checkpointing' if w.checkpointing else ''}")
    lines = [head, f"{'component':<12}{'GB':>13}{'GiB':>13}  rule"]
    for c in e.components:
        lines.append(f"{c.name:<12}{_size(c.bytes)}  {c.rule}")
    lines.append(f"{'total':<12}{_size(e.total)}")
    lines += [f"note: {n}" for n in e.notes]
    return "\n".join(lines)


def lora_breakdown(model: object, e: Estimate) -> str:
    """Per targeted linear: its shape, r(d_in + d_out) and how many times fewer than d_in*d_out."""
    arch = resolve_model(model) if not isinstance(model, Architecture) else model
    if not isinstance(arch, Architecture) or e.method.name not in ("lora", "qlora", "dora"):
        return ""
    seen: dict[str, tuple[int, int, int]] = {}
    for s in targeted_linears(arch, targets_for(arch, e.method)):
        d_in, d_out, n = seen.get(s.path, (s.d_in, s.d_out, 0))
        seen[s.path] = (d_in, d_out, n + 1)
    r = e.method.rank
    lines = [f"LoRA r={r}: A is (r, d_in), B is (d_out, r)"]
    for path, (d_in, d_out, n) in seen.items():
        p = lora_params(d_in, d_out, r)
        lines.append(f"  {path:<28} {d_out}x{d_in}: {p:,} instead of {d_in * d_out:,} "
                     f"({d_in * d_out / p:.0f}x fewer) x {n}")
    return "\n".join(lines)


def compare_table(estimates: Sequence[Estimate]) -> str:
    """Methods side by side, a row per component, in GB (1e9 bytes) and GiB, like the seeds' tables."""
    names = [e.method.name if e.method.name != "qlora" else "qlora (nf4)" for e in estimates]
    width = max(14, *(len(n) + 2 for n in names))
    lines = [f"{estimates[0].model}, batch {estimates[0].workload.batch} x seq {estimates[0].workload.seq}",
             f"{'':<14}" + "".join(f"{n:>{width}}" for n in names)]
    lines.append(f"{'trainable':<14}" + "".join(f"{e.trainable_params:>{width},}" for e in estimates))
    for name in COMPONENTS + ("total",):
        lines.append(f"{name + ' GB':<14}" + "".join(f"{gb(e[name]):>{width}.2f}" for e in estimates))
    lines.append(f"{'total GiB':<14}" + "".join(f"{gib(e.total):>{width}.2f}" for e in estimates))
    return "\n".join(lines)


def measured_table(rows: Sequence[tuple[str, float, float]]) -> str:
    """(component, estimated, measured) rows with the relative error."""
    lines = [f"{'component':<12}{'estimated':>14}{'measured':>14}{'error':>9}"]
    for name, est, meas in rows:
        err = f"{(est - meas) / meas:+.1%}" if meas else ("0" if not est else "n/a")
        lines.append(f"{name:<12}{est / 2**20:>10.2f} MiB{meas / 2**20:>10.2f} MiB{err:>9}")
    return "\n".join(lines)
