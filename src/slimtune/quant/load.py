"""Load a Hugging Face safetensors checkpoint straight into NF4, one tensor at a time.

The model is built with its parameters on the meta device (no memory), every Linear not kept is swapped
for an empty :class:`Linear4bit`, then each tensor is read from the memory-mapped file, quantized (or
kept) and dropped before the next one. Peak memory is the 4-bit model plus one float tensor, so a model
whose fp16 weights exceed RAM can still be quantized. Only safetensors and JSON are read; never pickle.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from slimtune.modules import set_submodule
from slimtune.quant.convert import QuantReport, check_quant_args, matches, measure
from slimtune.quant.linear4bit import QS_KEY, Linear4bit


@contextlib.contextmanager
def _params_on_meta() -> Iterator[None]:
    """Create parameters on the meta device while buffers (rotary tables...) are built normally."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def safetensors_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint folder (sharded or not). Raises FileNotFoundError."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [path / s for s in shards]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"path={str(path)!r}: no *.safetensors file (only safetensors checkpoints load)")
    return files


def load_quantized(path: str | Path, keep: tuple[str, ...] = ("lm_head",), block_size: int = 64,
                   double_quant: bool = True, compute_dtype: torch.dtype = torch.float32,
                   dtype: torch.dtype | None = None) -> tuple[nn.Module, QuantReport]:
    """(model, report): a causal LM from the Hugging Face folder ``path`` with its Linears in NF4.

    keep: layers left in ``dtype`` (default: ``compute_dtype``), as in ``quantize_model``. Tensors already
    in bitsandbytes' NF4 layout are taken as they are. Raises FileNotFoundError for a folder without
    config.json or safetensors, ValueError for bad arguments or tensors missing from the files.
    """
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    keep = check_quant_args(keep, block_size, double_quant, compute_dtype)
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"path={str(path)!r}: no config.json (expected a Hugging Face model folder)")
    dtype = dtype or compute_dtype
    config = AutoConfig.from_pretrained(path)
    with _params_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    quantized, kept = [], []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            if matches(name, keep):
                kept.append(name)
            else:
                set_submodule(model, name, Linear4bit(module.in_features, module.out_features, module.bias is not None,
                                                       block_size, double_quant, compute_dtype))
                quantized.append(name)
    loaded = set()
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt") as f:
            keys = list(f.keys())
            for key in keys:
                if "weight." in key and not key.endswith(".weight"):
                    continue  # NF4 statistics: read together with their weight below
                owner, _, leaf = key.rpartition(".")
                _load_tensor(model, owner, leaf, key, f, keys, dtype)
                loaded.add(key)
    _tie_or_fail(model, config, loaded, dtype)
    return model.eval(), measure(model, tuple(quantized), tuple(kept))


def _load_tensor(model: nn.Module, owner: str, leaf: str, key: str, f, keys: list[str], dtype: torch.dtype) -> None:
    try:
        module = model.get_submodule(owner)
    except AttributeError:
        return  # a tensor the architecture does not use (e.g. an old rotary cache): ignore as transformers does
    if isinstance(module, Linear4bit) and leaf == "weight":
        if f"{key}.{QS_KEY}" in keys:
            sd = {k[len(owner) + 1:]: f.get_tensor(k) for k in keys if k.startswith(key)}
            module.load_bnb(sd)
        else:
            module.load_float_weight(f.get_tensor(key), owner + ".")
    elif isinstance(module, Linear4bit):
        module.bias = nn.Parameter(f.get_tensor(key).to(module.compute_dtype), requires_grad=False)
    elif leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(f.get_tensor(key).to(dtype), requires_grad=False)
    elif leaf in module._buffers:
        module._buffers[leaf] = f.get_tensor(key)


def _tie_or_fail(model: nn.Module, config, loaded: set[str], dtype: torch.dtype) -> None:
    """Tie the output head to the input embedding when the config says so; fail on any tensor left unloaded."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if getattr(config, "tie_word_embeddings", False) and head is not None and emb is not None:
        head_name = next(n for n, m in model.named_modules() if m is head)
        if isinstance(head, Linear4bit):
            if f"{head_name}.weight" not in loaded:
                head.load_float_weight(emb.weight.detach())
        elif head.weight.is_meta:
            head.weight = emb.weight
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} tensors the model needs, e.g. {missing[:3]}")
    for p in model.parameters():
        p.requires_grad_(False)
