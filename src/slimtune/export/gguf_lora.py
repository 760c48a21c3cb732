"""A LoRA adapter alone as a GGUF file in llama.cpp's adapter layout (``llama-cli --lora``, Ollama ``ADAPTER``).

As llama.cpp's ``convert_lora_to_gguf.py`` writes it: ``general.type = adapter``, ``adapter.type = lora``,
``adapter.lora.alpha``, and per adapted weight ``<llama.cpp name>.lora_a`` = A (r, in) and ``.lora_b`` = B
(out, r). llama.cpp computes W x + (alpha / r) B A x, with r read from each tensor; the rotary permutation
of q/k rows acts on B's rows. One alpha serves every layer: a layer whose own scale (rsLoRA, per-layer rank or
alpha) differs from alpha / r has that ratio folded into its B.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from torch import nn

from slimtune.export import llama
from slimtune.export.errors import ExportError
from slimtune.export.gguf_model import write_file
from slimtune.files.write import atomic_write

LORA_DTYPES = ("f32", "f16", "bf16", "q8_0")  # what convert_lora_to_gguf.py offers


def lora_factors(model: nn.Module, adapter_name: str = "default") -> tuple[float, dict[str, np.ndarray]]:
    """(alpha, {``<name>.lora_a``: A (r, in), ``<name>.lora_b``: B (out, r)}) under llama.cpp's names, float32.

    Raises ExportError for an adapter llama.cpp cannot apply: DoRA, bottleneck or prompt adapters, LoRA on
    an embedding, fully trained modules (modules_to_save).
    """
    from slimtune.control import adapted_layers
    from slimtune.layers.dora import DoraLinear
    from slimtune.layers.lora import LoraLinear

    config = getattr(model, "slimtune_configs", {}).get(adapter_name)
    if config is None:
        raise ExportError(f"adapter {adapter_name!r}: the model has no such adapter")
    if getattr(config, "modules_to_save", ()):
        raise ExportError(f"adapter: modules_to_save={config.modules_to_save!r} are trained in full; a GGUF LoRA "
                          "adapter holds only low-rank pairs: export --format gguf (merged) instead")
    alpha, out = None, {}
    for name, layer in adapted_layers(model):
        a = layer.adapters[adapter_name] if adapter_name in layer.adapters else None
        if a is None:
            continue
        if isinstance(a, DoraLinear) or not isinstance(a, LoraLinear) or a.fan_in_fan_out:
            raise ExportError(f"adapter layer {name!r}: {type(a).__name__} has no llama.cpp LoRA form (plain LoRA on "
                              "Linear layers only); export --format gguf (merged) instead")
        alpha = a.scale * a.r if alpha is None else alpha
        B = a.lora_B.detach().float().cpu().numpy() * (a.scale * a.r / alpha)  # fold a per-layer scale into B
        heads = llama.rotary_heads(f"{name}.weight", model.config)
        if heads is not None:
            B = llama.permute_rotary(B, heads)
        tname = llama.gguf_name(f"{name}.weight", model.config)
        if tname is None:
            raise ExportError(f"adapter layer {name!r}: the tied output head has no tensor of its own in GGUF")
        out[f"{tname}.lora_a"] = a.lora_A.detach().float().cpu().numpy()
        out[f"{tname}.lora_b"] = np.ascontiguousarray(B)
    if alpha is None:
        raise ExportError(f"adapter {adapter_name!r}: wraps no layer")
    return float(alpha), out


def write_lora_gguf(model: nn.Module, path: str | Path, dtype: str = "f32", adapter_name: str = "default") -> Path:
    """Write ``model``'s adapter ``adapter_name`` (model not merged) to the GGUF adapter file ``path``.

    Raises ExportError for an architecture, dtype or adapter kind llama.cpp adapters cannot hold.
    """
    llama.check_dtype(dtype, LORA_DTYPES)
    llama.check_architecture(model.config)
    alpha, factors = lora_factors(model, adapter_name)
    wanted = llama.GGUF_DTYPES[dtype][0]
    tensors = []
    for tname, data in factors.items():
        qtype = llama.ggml_type(tname, data.shape, wanted)
        tensors.append((tname, llama.encode(data, qtype), qtype))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_file_type(llama.GGUF_DTYPES[dtype][1])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for tname, data, qtype in tensors:
            writer.add_tensor(tname, data, raw_dtype=qtype)
        write_file(writer)

    atomic_write(path, write)
    return path
