"""Export a fine-tune to where people run models: a plain Hugging Face folder, a GGUF file (llama.cpp,
Ollama, LM Studio) with its tokenizer and an Ollama Modelfile, or the adapter alone as a GGUF LoRA adapter.

Uses the core (adapter loading, ``merge_for_export``, ``save_pretrained_atomic``); the core never imports it.
Names load on first use, so the CLI's ``--help`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "slimtune.export.api": ("FORMATS", "HF_DTYPES", "ExportResult", "export"),
    "slimtune.export.errors": ("ExportError",),
    "slimtune.export.gguf_lora": ("LORA_DTYPES", "lora_factors", "write_lora_gguf"),
    "slimtune.export.gguf_model": ("write_gguf",),
    "slimtune.export.llama": ("GGUF_DTYPES", "permute_rotary"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'slimtune.export' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
