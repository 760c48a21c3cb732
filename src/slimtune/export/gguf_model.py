"""A merged Llama model (plain transformers module) as one GGUF file: metadata, tokenizer, weights.

Weights are taken in float32 (the merge's precision) and rounded once, here, to the requested GGML type.
The file is written to a temporary name in the same folder and renamed (``slimtune.files.write.atomic_write``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from torch import nn

from slimtune.export import llama
from slimtune.export.tokenizer import add_tokenizer, check_tokenizer
from slimtune.files.write import atomic_write


def gguf_tensors(model: nn.Module, dtype: str) -> list[tuple[str, np.ndarray, gguf.GGMLQuantizationType]]:
    """(llama.cpp name, encoded data, GGML type) for every tensor of ``model`` in its state-dict order.

    q/k projection rows are permuted to llama.cpp's rotary layout; a tied ``lm_head`` is left out.
    """
    config = model.config
    wanted = llama.GGUF_DTYPES[dtype][0]
    out = []
    for hf_name, tensor in model.state_dict().items():
        name = llama.gguf_name(hf_name, config)
        if name is None:
            continue
        data = tensor.detach().to("cpu", torch.float32).numpy()
        heads = llama.rotary_heads(hf_name, config)
        if heads is not None:
            data = llama.permute_rotary(data, heads)
        qtype = llama.ggml_type(name, data.shape, wanted)
        out.append((name, llama.encode(data, qtype), qtype))
    return out


def write_gguf(model: nn.Module, tokenizer: Any, path: str | Path, dtype: str = "f16", *,
               pre: str = "default", name: str | None = None) -> Path:
    """Write ``model`` (a plain LlamaForCausalLM, adapters merged) and ``tokenizer`` to the GGUF file ``path``.

    ``dtype``: one of ``llama.GGUF_DTYPES``. Raises ExportError for another architecture, dtype or tokenizer
    (before anything is written). Overwrites ``path`` atomically (callers check for an existing file).
    """
    llama.check_dtype(dtype)
    llama.check_architecture(model.config)
    check_tokenizer(tokenizer)
    tensors = gguf_tensors(model, dtype)  # every check and the rounding happen before the file is opened
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or path.stem)
        llama.add_hparams(writer, model.config)
        writer.add_file_type(llama.GGUF_DTYPES[dtype][1])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_tokenizer(writer, tokenizer, model.config.vocab_size, pre)
        for tname, data, qtype in tensors:
            writer.add_tensor(tname, data, raw_dtype=qtype)
        write_file(writer)

    atomic_write(path, write)
    return path


def write_file(writer: gguf.GGUFWriter) -> None:
    """Header, key/values, tensors; then close (the file is complete only after this)."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
