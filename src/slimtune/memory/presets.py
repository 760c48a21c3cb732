"""Model and GPU presets (no torch). Model numbers are copied from each model's published config.json."""

from __future__ import annotations

import re

from slimtune.memory.arch import Architecture

# Llama-family blocks without dropout; shapes from the Hugging Face config.json of each model.
MODELS: dict[str, Architecture] = {
    "llama-2-7b": Architecture("llama", 4096, 11008, 32, 32, 32, 128, 32000, False, 4096, "silu", name="llama-2-7b"),
    "llama-2-13b": Architecture("llama", 5120, 13824, 40, 40, 40, 128, 32000, False, 4096, "silu", name="llama-2-13b"),
    "llama-2-70b": Architecture("llama", 8192, 28672, 80, 64, 8, 128, 32000, False, 4096, "silu", name="llama-2-70b"),
    "llama-3-8b": Architecture("llama", 4096, 14336, 32, 32, 8, 128, 128256, False, 8192, "silu", name="llama-3-8b"),
    "mistral-7b": Architecture("llama", 4096, 14336, 32, 32, 8, 128, 32000, False, 32768, "silu", name="mistral-7b"),
    "qwen2.5-7b": Architecture(
        "llama", 3584, 18944, 28, 28, 4, 128, 152064, False, 32768, "silu", qkv_bias=True, name="qwen2.5-7b"
    ),
    "smollm2-135m": Architecture("llama", 576, 1536, 30, 9, 3, 64, 49152, True, 8192, "silu", name="smollm2-135m"),
    # GPT-3 (Brown et al. 2020, table 2.1) in GPT-2's layout; dropout off as in most fine-tuning.
    "gpt3-175b": Architecture("gpt2", 12288, 49152, 96, 96, 96, 128, 50257, True, 2048, "gelu_new", name="gpt3-175b"),
    "gpt2": Architecture(
        "gpt2", 768, 3072, 12, 12, 12, 64, 50257, True, 1024, "gelu_new", attn_dropout=0.1, hidden_dropout=0.1,
        name="gpt2",
    ),
    "bert-base": Architecture(
        "bert", 768, 3072, 12, 12, 12, 64, 30522, True, 512, "gelu", type_vocab=2, attn_dropout=0.1,
        hidden_dropout=0.1, name="bert-base",
    ),
}

# Memory as sold (GiB); what the driver leaves usable is a little less, see plan.RESERVE_BYTES.
GPUS: dict[str, float] = {
    "t4": 16 * 2**30,
    "l4": 24 * 2**30,
    "rtx-3090": 24 * 2**30,
    "rtx-4090": 24 * 2**30,
    "a100-40gb": 40 * 2**30,
    "a100-80gb": 80 * 2**30,
    "h100-80gb": 80 * 2**30,
}

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(gib|gb|mib|mb)?\s*$", re.IGNORECASE)
_UNITS = {"gib": 2**30, "gb": 1e9, "mib": 2**20, "mb": 1e6}


def model(name: str) -> Architecture:
    """A preset by name; errors list the presets."""
    if name not in MODELS:
        raise ValueError(f"model={name!r}: not a preset; must be one of {', '.join(MODELS)} or a config.json path")
    return MODELS[name]


def gpu_bytes(spec: str) -> float:
    """``24GB`` (1e9 bytes), ``24GiB``, ``24`` (GB) or a card name such as ``rtx-4090`` -> bytes."""
    key = spec.strip().lower()
    if key in GPUS:
        return GPUS[key]
    m = _SIZE.match(key)
    if not m:
        raise ValueError(f"gpu={spec!r}: must be a size such as 24GB or 24GiB, or one of {', '.join(GPUS)}")
    return float(m.group(1)) * _UNITS[(m.group(2) or "gb").lower()]
