"""What vLLM will refuse in an adapter_config.json, told when the adapter is saved rather than when it is served.

vLLM (0.32, ``vllm/lora/peft_helper.py``) serves plain LoRA only: it refuses DoRA, trained biases, ``modules_to_save``
other than a classification head, and inits (PiSSA, OLoRA) whose update is relative to a rewritten base. slimtune
still writes such adapters (PEFT and slimtune load them); ``save_adapter`` warns with the reasons. Torch-free.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping

CLASSIFIER_HEADS = ("classifier", "score")  # the only modules_to_save vLLM accepts
REWRITING_INITS = ("pissa", "olora", "loftq", "corda", "eva")


class VllmIncompatibleWarning(UserWarning):
    """An adapter was saved that vLLM's ``--lora-modules`` / ``load_lora_adapter`` will refuse."""


def vllm_refusals(config: Mapping[str, Any]) -> list[str]:
    """The reasons vLLM will refuse the adapter described by the PEFT ``config`` dict; empty when it loads."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        return [f"peft_type={peft_type!r}: vLLM serves LoRA adapters only"]
    reasons = []
    if config.get("use_dora"):
        reasons.append("use_dora=true: vLLM does not support DoRA (merge it: `slimtune export --format hf`)")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        reasons.append(f"bias={config.get('bias')!r}: vLLM does not support trained biases")
    others = [m for m in config.get("modules_to_save") or () if m not in CLASSIFIER_HEADS]
    if others:
        reasons.append(f"modules_to_save={others}: vLLM accepts only {list(CLASSIFIER_HEADS)} there")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.split("_")[0].lower() in REWRITING_INITS:
        reasons.append(f"init_lora_weights={init!r}: its update is relative to a rewritten base vLLM does not have")
    return reasons


def warn_if_vllm_refuses(config: Mapping[str, Any], folder: Any) -> list[str]:
    """Warn (VllmIncompatibleWarning) naming ``folder`` and every reason; returns the reasons."""
    reasons = vllm_refusals(config)
    if reasons:
        warnings.warn(f"{folder}: saved, but vLLM will not load this adapter: {'; '.join(reasons)}. "
                      "PEFT, transformers and `slimtune serve` load it.", VllmIncompatibleWarning, stacklevel=3)
    return reasons
