"""The method family, behind one entry point: ``prepare(model, config)``.

    cfg = slimtune.load_config("configs/dora.yaml")      # method: lora | dora | bottleneck | prompt | freeze | full
    report = prepare(model, cfg)                         # what trains; trainable vs total parameters

LoRA/DoRA/bottleneck wrap layers (``slimtune.injection``); prompt tuning adds virtual tokens through a
forward hook; freeze and full only choose which parameters train.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from slimtune.config import (BottleneckConfig, FreezeConfig, FullConfig, LoraConfig, MethodConfig,
                             PromptTuningConfig)


def prepare(model: nn.Module, config: MethodConfig, adapter_name: str = "default", tokenizer: Any = None) -> Any:
    """Set ``model`` up for training with ``config``'s method, in place; returns the method's report.

    ``tokenizer`` is only used by prompt tuning's ``init='text'``. Raises TypeError for an unknown config.
    """
    from slimtune.injection import inject
    from slimtune.methods.freeze import apply_freeze, apply_full
    from slimtune.methods.prompt import inject_prompt

    if isinstance(config, (LoraConfig, BottleneckConfig)):
        return inject(model, config, adapter_name)
    if isinstance(config, PromptTuningConfig):
        return inject_prompt(model, config, adapter_name, tokenizer=tokenizer)
    if isinstance(config, FreezeConfig):
        return apply_freeze(model, config)
    if isinstance(config, FullConfig):
        return apply_full(model, config)
    raise TypeError(f"config must be one of LoraConfig, BottleneckConfig, PromptTuningConfig, FreezeConfig, "
                    f"FullConfig; got {type(config).__name__}")
