"""The adapter alone as a GGUF LoRA adapter, checked the way llama.cpp applies it against PEFT's merge."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

import slimtune
from slimtune.export import ExportError, export, write_lora_gguf
from slimtune.export.source import Source, load_with_adapter
from tests.export.conftest import load_base, peft_merged, save_lora


def tensors(path) -> dict[str, np.ndarray]:
    """name -> float32 array in torch's (row-major, reversed GGUF) shape."""
    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
            for t in gguf.GGUFReader(path).tensors}


def apply_like_llama_cpp(base_gguf: dict, adapter_path) -> dict[str, np.ndarray]:
    """llama.cpp's LoRA: W + (alpha / r) * lora_b @ lora_a on the GGUF (rotary-permuted) weights."""
    fields = gguf.GGUFReader(adapter_path).fields
    alpha = float(fields["adapter.lora.alpha"].contents())
    lora, out = tensors(adapter_path), dict(base_gguf)
    for name in {n.rsplit(".", 1)[0] for n in lora}:
        a, b = lora[f"{name}.lora_a"], lora[f"{name}.lora_b"]
        out[name] = base_gguf[name] + (alpha / a.shape[0]) * (b @ a)
    return out


def from_gguf_layout(name: str, w: np.ndarray, config) -> np.ndarray:
    """transformers' reader undoes the q/k permutation: the oracle for going back to HF's layout."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    for key, n in heads.items():
        if f".{key}." in name:
            return LlamaTensorProcessor()._reverse_permute_weights(w, n, n)
    return w


@pytest.mark.parametrize("options", [{}, {"use_rslora": True, "r": 8, "alpha": 4.0},
                                     {"rank_pattern": {"k_proj": 2}, "alpha_pattern": {"up_proj": 3.0}}])
def test_adapter_applied_as_llama_cpp_does_equals_peft_merge(base_dir, tiny_tokenizer, tmp_path, options):
    adapter = save_lora(base_dir, tmp_path / "adapter", **options)
    model = load_with_adapter(Source(adapter, None, str(base_dir)))
    lora_path = write_lora_gguf(model, tmp_path / "lora.gguf", "f32")
    base_gguf = tensors(slimtune.export.write_gguf(load_base(base_dir), tiny_tokenizer, tmp_path / "b.gguf", "f32"))
    merged = apply_like_llama_cpp(base_gguf, lora_path)
    oracle = peft_merged(base_dir, adapter).state_dict()
    from slimtune.export.llama import gguf_name

    cfg = model.config
    for hf_name, want in oracle.items():
        name = gguf_name(hf_name, cfg)
        if name is not None:
            got = from_gguf_layout(name, merged[name], cfg)
            np.testing.assert_allclose(got, want.numpy(), atol=1e-6, rtol=0, err_msg=hf_name)


def test_layout_and_metadata(base_dir, adapter_dir, tmp_path):
    path = export(adapter_dir, tmp_path / "a.gguf", base=str(base_dir), fmt="gguf-lora", dtype="q8_0").path
    reader = gguf.GGUFReader(path)
    f = reader.fields
    assert (f["general.type"].contents(), f["adapter.type"].contents()) == ("adapter", "lora")
    assert f["general.architecture"].contents() == "llama"
    assert f["adapter.lora.alpha"].contents() == pytest.approx(8.0)  # scale 2 * r 4
    by_name = {t.name: t for t in reader.tensors}
    a, b = by_name["blk.1.attn_q.weight.lora_a"], by_name["blk.1.attn_q.weight.lora_b"]
    # GGUF lists dims innermost first: lora_a (r=4, in=64) -> [64, 4]; lora_b (out=64, r=4) -> [4, 64]
    assert (a.shape.tolist(), b.shape.tolist()) == ([64, 4], [4, 64])
    assert a.tensor_type == gguf.GGMLQuantizationType.Q8_0  # rows of 64: whole Q8_0 blocks
    assert b.tensor_type == gguf.GGMLQuantizationType.F16  # rows of 4: llama.cpp's F16 fallback
    assert len(by_name) == 2 * 2 * 7  # 2 layers x 7 linear layers x (a, b)


def test_dora_is_refused(base_dir, tmp_path):
    adapter = save_lora(base_dir, tmp_path / "dora", use_dora=True)
    with pytest.raises(ExportError, match=r"DoraLinear has no llama.cpp LoRA form.*--format gguf"):
        export(adapter, tmp_path / "d.gguf", base=str(base_dir), fmt="gguf-lora")
    assert not (tmp_path / "d.gguf").exists()


def test_modules_to_save_are_refused(base_dir, tmp_path):
    model = load_base(base_dir)
    slimtune.inject(model, slimtune.LoraConfig(r=2, target_modules=("q_proj",), modules_to_save=("lm_head",)))
    with pytest.raises(ExportError, match=r"modules_to_save=\('lm_head',\).*--format gguf"):
        write_lora_gguf(model, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_lora_dtype_it_cannot_hold(base_dir, adapter_dir, tmp_path):
    with pytest.raises(ExportError, match=r"--dtype='q4_0'.*f32, f16, bf16, q8_0"):
        export(adapter_dir, tmp_path / "a.gguf", base=str(base_dir), fmt="gguf-lora", dtype="q4_0")
    assert list(tmp_path.iterdir()) == []


def test_half_precision_adapter_close_to_f32(base_dir, adapter_dir, tmp_path):
    f32 = tensors(export(adapter_dir, tmp_path / "a32.gguf", base=str(base_dir), fmt="gguf-lora").path)
    f16 = tensors(export(adapter_dir, tmp_path / "a16.gguf", base=str(base_dir), fmt="gguf-lora", dtype="f16").path)
    for name, w in f32.items():
        np.testing.assert_array_equal(f16[name], torch.from_numpy(np.array(w)).half().float().numpy())
