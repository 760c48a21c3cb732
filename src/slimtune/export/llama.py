"""Llama in llama.cpp's GGUF layout: hyper-parameter keys, tensor names, the rotary q/k row permutation, and
which GGML type each tensor is stored in.

Facts from llama.cpp's ``convert_hf_to_gguf.py`` (``LlamaModel``, ``ModelBase.prepare_tensors``): Hugging Face
applies rotary embeddings to the two halves of each head (``rotate_half``), llama.cpp to adjacent pairs, so the
rows of q_proj / k_proj are permuted per head; 1-D tensors and norms stay F32; a row that is not a whole number
of quantization blocks falls back to F16. Names come from ``gguf.get_tensor_name_map`` (the gguf package).
"""

from __future__ import annotations

from typing import Any

import gguf
import numpy as np

from slimtune.export.errors import ExportError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
# --dtype -> (GGML type of the matrices, general.file_type)
GGUF_DTYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
# types users ask for that gguf 0.19 can only read (no NumPy quantizer): refused with a way forward
KQUANTS = ("q4_k_m", "q4_k_s", "q5_k_m", "q5_k_s", "q6_k", "q3_k_m", "q2_k")


def check_dtype(dtype: str, allowed: tuple[str, ...] = tuple(GGUF_DTYPES)) -> None:
    """Raise ExportError naming ``--dtype`` unless it is one of ``allowed``."""
    if dtype in allowed:
        return
    if dtype in KQUANTS:
        raise ExportError(f"--dtype={dtype!r}: the gguf package cannot quantize K-quants (it only reads them); "
                          f"export --dtype f16, then run llama.cpp's: llama-quantize model-f16.gguf "
                          f"model-{dtype}.gguf {dtype.upper()} (or use one of {', '.join(allowed)})")
    raise ExportError(f"--dtype={dtype!r}: a GGUF export holds one of {', '.join(allowed)}")


def check_architecture(config: Any) -> None:
    """Raise ExportError unless ``config`` (a transformers config) is a Llama-family causal LM."""
    archs = tuple(getattr(config, "architectures", None) or ())
    model_type = getattr(config, "model_type", None)
    if model_type != "llama" or not set(archs) <= set(SUPPORTED_ARCHITECTURES):
        raise ExportError(f"architecture {archs or model_type!r}: GGUF export supports "
                          f"{', '.join(SUPPORTED_ARCHITECTURES)} (Llama family, e.g. SmolLM2) so far; export "
                          "--format hf for this model")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ExportError("architecture: Llama with attention/MLP biases is not supported in GGUF export yet")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ExportError(f"rope_parameters.rope_type={rope.get('rope_type')!r}: GGUF export supports 'default' "
                          "rotary embeddings so far")


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def add_hparams(writer: gguf.GGUFWriter, config: Any) -> None:
    """The llama.* keys llama.cpp and transformers' GGUF reader need to rebuild ``config``."""
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim(config))


def permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of a q/k projection (out, ...) from HF's half-split rotary layout to llama.cpp's interleaved pairs.

    Per head the rows [x0..x(d/2-1), y0..y(d/2-1)] become [x0, y0, x1, y1, ...]. ``n_head``: query heads for
    q_proj, key/value heads for k_proj. Works on a weight (out, in) and on a LoRA B (out, r).
    """
    out = w.shape[0]
    return w.reshape(n_head, 2, out // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rotary_heads(hf_name: str, config: Any) -> int | None:
    """How many heads to permute ``hf_name``'s rows over (q_proj: heads, k_proj: kv heads), else None."""
    if hf_name.endswith("self_attn.q_proj.weight"):
        return config.num_attention_heads
    if hf_name.endswith("self_attn.k_proj.weight"):
        return config.num_key_value_heads
    return None


def gguf_name(hf_name: str, config: Any) -> str | None:
    """llama.cpp's name for a Hugging Face Llama tensor (``model.layers.0.self_attn.q_proj.weight`` ->
    ``blk.0.attn_q.weight``); None for tensors llama.cpp does not store (a tied ``lm_head``)."""
    if hf_name == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
        return None
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise ExportError(f"tensor {hf_name!r}: has no llama.cpp name; the model is not a plain Llama")
    return name


# the output head (and token_embd, which doubles as it when tied) is the most sensitive matrix: llama-quantize
# keeps it at 6 bits in 4-bit files; with no NumPy Q6_K, 4-bit exports keep it in Q8_0
HEAD_TENSORS = ("output.weight", "token_embd.weight")
FOUR_BIT = (gguf.GGMLQuantizationType.Q4_0,)


def ggml_type(name: str, shape: tuple[int, ...], wanted: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    """llama.cpp's converter rule: 1-D tensors and norms F32; a quantized type needs whole blocks per row
    (the last dimension), else F16. In 4-bit files the head and embedding stay Q8_0."""
    if len(shape) <= 1 or name.endswith("_norm.weight"):
        return gguf.GGMLQuantizationType.F32
    if wanted in FOUR_BIT and name in HEAD_TENSORS:
        wanted = gguf.GGMLQuantizationType.Q8_0
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    return wanted if shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16


def encode(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """``data`` (float32) in ``qtype``'s bytes (or float array for F32/F16), as GGUFWriter.add_tensor takes it."""
    data = np.ascontiguousarray(data, dtype=np.float32)
    if qtype == gguf.GGMLQuantizationType.F32:
        return data
    if qtype == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, qtype)
