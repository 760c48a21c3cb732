"""GGUF model export, read back by transformers' own GGUF loader (the independent reader)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from slimtune.export import write_gguf
from tests.export.conftest import SMOL_VOCAB, TEXT, logits, read_gguf_model, rounded, sample_ids, tiny_smol_llama

GGML = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def model():
    return tiny_smol_llama()


@pytest.fixture(scope="module")
def smol_model():
    return tiny_smol_llama(vocab=SMOL_VOCAB)


@pytest.fixture(scope="module")
def exported(model, tiny_tokenizer, tmp_path_factory):
    """dtype -> (path, transformers' read-back model): each file written and read once per module."""
    folder, cache = tmp_path_factory.mktemp("gguf"), {}

    def get(dtype: str):
        if dtype not in cache:
            path = write_gguf(model, tiny_tokenizer, folder / f"m-{dtype}.gguf", dtype)
            cache[dtype] = path, read_gguf_model(path)
        return cache[dtype]

    return get


def test_f32_reads_back_exactly(model, exported):
    back = exported("f32")[1]
    for name, t in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name
    ids = sample_ids()
    torch.testing.assert_close(logits(back, ids), logits(model, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype, torch_dtype", [("f16", torch.float16), ("bf16", torch.bfloat16)])
def test_16_bit_is_the_weights_rounded_once(model, exported, dtype, torch_dtype):
    back, want = exported(dtype)[1], rounded(model, torch_dtype)
    for name, t in want.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name  # round to nearest even, like torch
    ids = sample_ids()
    torch.testing.assert_close(logits(back, ids), logits(want, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype, levels", [("q8_0", 127), ("q4_0", 8)])
def test_quantized_weights_within_one_step(model, exported, dtype, levels):
    """Each block of 32 is stored as round(w / d) * d with d = max|w| / levels (d in f16): every weight is within
    about half a step (q8_0) or one step (q4_0: the extreme of the other sign clips) of the merged weight."""
    back = exported(dtype)[1].state_dict()
    for name, w in model.state_dict().items():
        if w.dim() < 2:
            assert torch.equal(back[name], w), name
            continue
        n = 127 if name == "model.embed_tokens.weight" else levels  # the tied head stays Q8_0 in 4-bit files
        blocks = w.reshape(-1, 32)
        step = blocks.abs().amax(dim=1, keepdim=True) / n
        err = (back[name].reshape(-1, 32) - blocks).abs()
        bound = 0.56 * step if n == 127 else 1.01 * step
        assert bool((err <= bound + 1e-8).all()), name


def test_q8_0_logits_within_the_documented_tolerance(model, exported):
    """Documented tolerance (design doc): q8_0 logits within 2% of the logits' range of the float32 model."""
    ids = sample_ids()
    want = logits(model, ids)
    diff = (logits(exported("q8_0")[1], ids) - want).abs().max()
    assert diff <= 0.02 * (want.max() - want.min())


def test_untied_output_head(tiny_tokenizer, tmp_path):
    model = tiny_smol_llama(tie=False)
    path = write_gguf(model, tiny_tokenizer, tmp_path / "untied.gguf", "f32")
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    assert "output.weight" in names
    ids = sample_ids()
    torch.testing.assert_close(logits(read_gguf_model(path), ids), logits(model, ids), atol=1e-4, rtol=0)


def test_tied_model_has_no_output_tensor_and_norms_in_f32(exported):
    reader = gguf.GGUFReader(exported("q8_0")[0])
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert "output.weight" not in types
    assert types["blk.0.attn_norm.weight"] == GGML.F32 and types["output_norm.weight"] == GGML.F32
    assert types["blk.0.attn_q.weight"] == GGML.Q8_0 and types["token_embd.weight"] == GGML.Q8_0
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["llama.attention.head_count_kv"].contents() == 2


@pytest.mark.parametrize("which", ["tiny", "smol"])
def test_tokenizer_reads_back_with_same_ids(which, request, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = request.getfixturevalue(f"{which}_tokenizer")
    model = request.getfixturevalue("model" if which == "tiny" else "smol_model")
    path = write_gguf(model, tokenizer, tmp_path / "tok.gguf", "f16")
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    assert back(TEXT).input_ids == tokenizer(TEXT).input_ids
    chat = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    assert back.apply_chat_template(chat) == tokenizer.apply_chat_template(chat)
    assert (back.bos_token_id, back.eos_token_id, back.pad_token_id) == (1, 2, 2)


def test_tokenizer_metadata_equals_llama_cpp_converters(smol_model, smol_tokenizer, tmp_path):
    """The bundled SmolLM2 GGUF was written by llama.cpp's convert_hf_to_gguf.py: our tokens, token types,
    merges, special ids and chat template must be the same."""
    from slimtune.assets import SMOLLM2_GGUF, SMOLLM2_PACKAGE, package_dir

    theirs = gguf.GGUFReader(package_dir(SMOLLM2_PACKAGE, "") / SMOLLM2_GGUF).fields
    ours = gguf.GGUFReader(write_gguf(smol_model, smol_tokenizer, tmp_path / "m.gguf", "f16", pre="smollm")).fields
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.chat_template",
                "tokenizer.ggml.add_bos_token"):
        assert ours[key].contents() == theirs[key].contents(), key


def test_interrupted_write_leaves_no_file(model, tiny_tokenizer, tmp_path, monkeypatch):
    def fail(self, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    with pytest.raises(KeyboardInterrupt):
        write_gguf(model, tiny_tokenizer, tmp_path / "m.gguf", "f16")
    assert list(tmp_path.iterdir()) == []


def test_rounding_happens_once_from_float32(model, exported):
    """A bf16 file holds round(w_fp32), not round(round_f16(w)): checked on one matrix directly."""
    reader = gguf.GGUFReader(exported("bf16")[0])
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight")
    stored = gguf.quants.dequantize(t.data, t.tensor_type).reshape(128, 64)
    want = model.model.layers[0].mlp.up_proj.weight.detach().to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(stored, want)


def test_sentencepiece_style_tokenizer_is_refused(model, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from slimtune.export import ExportError

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator([TEXT] * 5, trainers.BpeTrainer(vocab_size=100, special_tokens=["<unk>"],
                                                            show_progress=False))
    spm_like = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    with pytest.raises(ExportError, match=r"tokenizer: SentencePiece-style BPE tokenizers are not supported"):
        write_gguf(model, spm_like, tmp_path / "m.gguf", "f16")
    assert list(tmp_path.iterdir()) == []
