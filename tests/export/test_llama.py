"""The Llama layout rules: the rotary permutation against transformers' reader, tensor names and types."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from slimtune.export import ExportError
from slimtune.export import llama
from tests.export.conftest import tiny_smol_llama


@pytest.mark.parametrize("n_head, rows", [(4, 64), (2, 32), (9, 576), (3, 192)])
def test_permute_is_undone_by_transformers_gguf_reader(n_head, rows):
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = np.random.default_rng(0).standard_normal((rows, 24)).astype(np.float32)
    permuted = llama.permute_rotary(w, n_head)
    assert not np.array_equal(permuted, w)
    back = LlamaTensorProcessor()._reverse_permute_weights(permuted, n_head, n_head)
    np.testing.assert_array_equal(back, w)


def test_permute_turns_half_split_rotary_into_adjacent_pairs():
    """The maths: HF rotates (x_i, x_{i+d/2}) pairs, llama.cpp (x_{2i}, x_{2i+1}): after the permutation row
    2i of each head is HF row i and row 2i+1 is HF row i + d/2."""
    n_head, d = 2, 8
    w = np.arange(n_head * d, dtype=np.float32)[:, None]  # row index as value
    p = llama.permute_rotary(w, n_head)[:, 0]
    for h in range(n_head):
        for i in range(d // 2):
            assert p[h * d + 2 * i] == h * d + i
            assert p[h * d + 2 * i + 1] == h * d + i + d // 2


def test_names_follow_llama_cpp():
    cfg = tiny_smol_llama().config
    assert llama.gguf_name("model.embed_tokens.weight", cfg) == "token_embd.weight"
    assert llama.gguf_name("model.layers.1.self_attn.k_proj.weight", cfg) == "blk.1.attn_k.weight"
    assert llama.gguf_name("model.layers.0.mlp.gate_proj.weight", cfg) == "blk.0.ffn_gate.weight"
    assert llama.gguf_name("model.layers.0.post_attention_layernorm.weight", cfg) == "blk.0.ffn_norm.weight"
    assert llama.gguf_name("model.norm.weight", cfg) == "output_norm.weight"
    assert llama.gguf_name("lm_head.weight", cfg) is None  # tied: llama.cpp reuses token_embd
    assert llama.gguf_name("lm_head.weight", tiny_smol_llama(tie=False).config) == "output.weight"


def test_tensor_types_as_llama_cpp_converter():
    Q8, F16, F32 = (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32)
    assert llama.ggml_type("blk.0.attn_norm.weight", (64,), Q8) == F32
    assert llama.ggml_type("blk.0.attn_q.weight", (64, 64), Q8) == Q8
    assert llama.ggml_type("blk.0.attn_q.weight.lora_b", (64, 4), Q8) == F16  # rows of 4: no whole Q8_0 block
    assert llama.ggml_type("blk.0.attn_q.weight", (64, 64), F16) == F16
    Q4 = gguf.GGMLQuantizationType.Q4_0
    assert llama.ggml_type("blk.0.attn_q.weight", (64, 64), Q4) == Q4
    assert llama.ggml_type("token_embd.weight", (384, 64), Q4) == Q8  # the (tied) head keeps 8 bits
    assert llama.ggml_type("output.weight", (384, 64), Q4) == Q8


def test_k_quants_are_refused_with_a_way_forward():
    with pytest.raises(ExportError, match=r"--dtype='q4_k_m'.*llama-quantize"):
        llama.check_dtype("q4_k_m")
    with pytest.raises(ExportError, match=r"--dtype='int3'.*f32, f16, bf16, q8_0, q4_0"):
        llama.check_dtype("int3")


def test_other_architectures_are_refused():
    from tests.conftest import tiny_gpt2

    with pytest.raises(ExportError, match=r"architecture 'gpt2': GGUF export supports LlamaForCausalLM.*--format hf"):
        llama.check_architecture(tiny_gpt2().config)
