"""slimtune: fine-tune large models on small hardware.

    import slimtune
    report = slimtune.inject(model, slimtune.LoraConfig(r=8, alpha=16, target_modules="all-linear"))
    print(report)                      # what was wrapped; trainable vs total parameters
    ...train...
    slimtune.save_adapter(model, "out/adapter")   # a PEFT-compatible folder of a few MB
    model = slimtune.merge_and_unload(model)      # a plain model, zero added latency

Names are imported on first use, so ``import slimtune`` (and the memory estimator, the CLI's
``--help``) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from slimtune.version import __version__

_EXPORTS = {
    "slimtune.config": ("BottleneckConfig", "ConfigError", "FreezeConfig", "FullConfig", "LoraConfig",
                        "PromptTuningConfig", "config_from_dict", "load_config", "save_config"),
    "slimtune.methods": ("prepare",),
    "slimtune.methods.loraplus": ("create_loraplus_optimizer", "loraplus_param_groups"),
    "slimtune.control": ("active_adapters", "adapter_names", "delete_adapter", "disable_adapters", "merge",
                         "merge_and_unload", "set_active", "unmerge"),
    "slimtune.files": ("AdapterFileError", "load_adapter", "save_adapter"),
    "slimtune.fingerprint": ("BaseModelMismatch",),
    "slimtune.injection": ("InjectionReport", "inject"),
    "slimtune.quant": ("Linear4bit", "dequantize_model", "dequantize_nf4", "load_quantized", "quantize_model",
                       "quantize_nf4"),
    "slimtune.optim": ("AdamW8bit", "OffloadedOptimizer", "load_optimizer", "save_optimizer"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'slimtune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
