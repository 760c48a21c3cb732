"""Estimate vs measured on a real model (imports torch lazily).

The estimate is made for exactly what is measured: the device the step runs on, torch's AdamW (whose
moments have the weights' dtype) and gradients in the weights' dtype.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slimtune.memory.arch import Architecture, from_hf_config
from slimtune.memory.estimate import Estimate, estimate
from slimtune.memory.measure import Measured, measure_step
from slimtune.memory.spec import Method, Precision, Workload

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


def build_model(ref: Any) -> tuple["nn.Module", Architecture]:
    """(model, architecture) for ``smollm2-135m`` (the real weights), a config.json path or a config
    dict (random weights; BERT gets its masked-LM head), or a Hugging Face model.

    Raises ValueError for other presets: they are too large to train here.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    if ref == "smollm2-135m":
        from slimtune.assets import load_smollm2, smollm2_path

        return load_smollm2()[0], replace(from_hf_config(smollm2_path()), name="smollm2-135m")
    if hasattr(ref, "config") and hasattr(ref, "parameters"):
        return ref, from_hf_config(ref.config.to_dict())
    if isinstance(ref, (str, Path)) and Path(ref).exists():
        path = Path(ref) / "config.json" if Path(ref).is_dir() else Path(ref)
        import json

        ref = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(ref, dict):
        raise ValueError(f"model={ref!r}: --measure needs smollm2-135m or a config.json (other presets are too "
                         "large to train on this machine)")
    arch = from_hf_config(ref)
    config = AutoConfig.for_model(**ref)
    auto = AutoModelForMaskedLM if arch.family == "bert" else AutoModelForCausalLM
    return auto.from_config(config), arch


def measured_precision(precision: Precision, method: Method, device: str) -> Precision:
    """The precision a measured step really has: float weights (fp32 on CPU unless given, bf16 on
    CUDA), gradients and AdamW moments in the trainable weights' dtype."""
    weight = precision.weight_dtype or ("fp32" if device == "cpu" and method.name != "qlora" else None)
    p = replace(precision, weight_dtype=weight, grad_dtype=None)
    return replace(p, optim_dtype=p.trainable_dtype(method.name))


def measure_against_estimate(ref: Any, method: Method, precision: Precision, workload: Workload,
                             steps: int = 1) -> tuple[Estimate, Measured]:
    """Run ``steps`` training steps of ``ref`` (see :func:`build_model`) on CUDA when present, else on
    the CPU, and estimate the same step. Raises ValueError for what cannot be measured."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    workload = replace(workload, device=device)
    precision = measured_precision(precision, method, device)
    model, arch = build_model(ref)
    measured = measure_step(model, method, precision, workload, steps=steps)
    return estimate(arch, method, precision, workload), measured
