"""A Hugging Face byte-level BPE tokenizer as GGUF metadata (llama.cpp's ``gpt2`` tokenizer model).

As llama.cpp's converter does (``get_vocab_base`` / ``_set_vocab_gpt2``): one token string per id up to the
model's vocabulary size (ids the tokenizer lacks become ``[PAD<id>]``, UNUSED), token types (special added
tokens CONTROL, other added tokens USER_DEFINED, the rest NORMAL), then the merges, special-token ids,
add-bos/eos flags and chat template through ``gguf.SpecialVocab`` reading the saved tokenizer.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import gguf

from slimtune.export.errors import ExportError

PRE_KEY = "tokenizer.ggml.pre"


def vocab_entries(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """(tokens, token types), one per id in ``range(vocab_size)``. Raises ExportError for a tokenizer larger
    than the model's embedding."""
    vocab = tokenizer.get_vocab()
    if len(vocab) > vocab_size:
        raise ExportError(f"tokenizer: {len(vocab)} tokens but the model's vocab_size is {vocab_size}; "
                          "resize the embeddings before exporting")
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def check_tokenizer(tokenizer: Any) -> None:
    """Raise ExportError unless ``tokenizer`` is a fast byte-level BPE tokenizer (what ``gpt2`` means in GGUF).

    A SentencePiece-style BPE (Metaspace, byte fallback: Llama 2, Mistral) is GGUF's ``llama`` tokenizer model,
    which needs scores this writer does not produce yet."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(f"tokenizer: {type(tokenizer).__name__} is a slow tokenizer; GGUF export reads a fast "
                          "(tokenizer.json) byte-level BPE tokenizer")
    spec = json.loads(backend.to_str())
    kind = spec["model"]["type"]
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer"))
    if kind != "BPE" or not byte_level or spec["model"].get("byte_fallback"):
        what = kind if kind != "BPE" else "SentencePiece-style BPE"
        raise ExportError(f"tokenizer: {what} tokenizers are not supported in GGUF export yet; a byte-level BPE "
                          "(GPT-2 style, as SmolLM2 and Llama 3 use) is; export --format hf instead")


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer: Any, vocab_size: int, pre: str) -> None:
    """Write the tokenizer.* keys. ``pre``: llama.cpp's pre-tokenizer name (``smollm``, ``llama-bpe``, ...)."""
    check_tokenizer(tokenizer)
    tokens, types = vocab_entries(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory(prefix="slimtune-tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)  # SpecialVocab reads tokenizer.json, tokenizer_config.json, the template
        special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise ExportError("tokenizer: no BPE merges found in its tokenizer.json; GGUF readers cannot rebuild it")
    special.add_special_token.update(adds_special(tokenizer))  # stated, not left to each reader's default
    special.add_to_gguf(writer, quiet=True)


def adds_special(tokenizer: Any) -> dict[str, bool]:
    """Whether encoding adds the BOS / EOS token, as observed (``tokenizer.ggml.add_bos_token`` / ``add_eos``):
    llama.cpp otherwise assumes its own default for the tokenizer type."""
    ids = tokenizer("a").input_ids
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return {"bos": bos is not None and ids[0] == bos, "eos": eos is not None and ids[-1] == eos}


def pre_tokenizer_of(gguf_file: Path | None) -> str:
    """``tokenizer.ggml.pre`` of the GGUF file the base came from (llama.cpp picks it from a hash of the
    tokenizer's output; copying it keeps the base's choice), else ``default``."""
    if gguf_file is None:
        return "default"
    field = gguf.GGUFReader(gguf_file).fields.get(PRE_KEY)
    return field.contents() if field is not None else "default"
