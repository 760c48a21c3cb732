"""Loading the base model a run fine-tunes: the bundled SmolLM2, a local Hugging Face folder or a .gguf file.

Only local files are read (no hub): a name that is neither the bundled model nor an existing path is an error
naming the field. Weights load in ``model.dtype``; ``quantize: nf4`` then turns every frozen linear layer but the
output heads into NF4 (QLoRA), computing in the model's dtype.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

BUNDLED = ("smollm2-135m", "smollm2-135m-instruct")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(ValueError):
    """``model.name`` is neither the bundled model nor a loadable local folder / .gguf file."""


def resolve(name: str) -> tuple[Path, str | None]:
    """(folder, gguf file name or None) for ``model.name``. Raises ModelLoadError naming the value."""
    if name.lower() in BUNDLED:
        from slimtune.assets import smollm2_path

        return smollm2_path(), None
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"model.name={name!r}: no such .gguf file")
        return path.parent, path.name
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model.name={name!r}: must be {BUNDLED[0]!r}, a Hugging Face model folder (with "
                             "config.json) or a .gguf file; nothing is downloaded")
    return path, None


def load_tokenizer(name: str) -> Any:
    """The tokenizer of ``model.name``, with a pad token (the EOS when it has none: padding only, labels never
    come from the pad mask)."""
    from transformers import AutoTokenizer

    folder, gguf = resolve(name)
    tokenizer = AutoTokenizer.from_pretrained(folder, **({"gguf_file": gguf} if gguf else {}))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str, dtype: str, *, num_labels: int | None = None, pad_token_id: int | None = None) -> nn.Module:
    """The model in eval mode: a causal LM, or a sequence classifier with a new ``num_labels`` head."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    folder, gguf = resolve(name)
    kw: dict[str, Any] = {"dtype": DTYPES[dtype], **({"gguf_file": gguf} if gguf else {})}
    if num_labels is not None:
        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=num_labels, **kw)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = pad_token_id  # a classifier finds each row's last real token by it
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, **kw)
    if gguf:  # GGUF weights are dequantized on load: a plain model from here on
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model.eval()


def enable_checkpointing(model: nn.Module) -> None:
    """Gradient checkpointing that works with a frozen embedding (the "element 0 of tensors does not require
    grad" trap): non-reentrant checkpoints, and the embedding output made to require grad."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.config.use_cache = False
