"""Encoders on the real SmolLM2 tokenizer: which tokens are trained, decoded back to text (the oracle)."""

from __future__ import annotations

import copy

import pytest

from slimtune.train.data import IGNORE, Example, collate, encode
from slimtune.train.data.formats import ALPACA_PROMPT, ALPACA_PROMPT_INPUT


def trained_segments(tok, ex: Example) -> list[str]:
    """The decoded runs of consecutive trained tokens (special tokens kept)."""
    runs, cur = [], []
    for tid, lab in zip(ex.input_ids, ex.labels):
        if lab != IGNORE:
            assert lab == tid  # labels are the tokens themselves (the model shifts them)
            cur.append(tid)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r, skip_special_tokens=False) for r in runs]


CHAT = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello there!"},
    {"role": "user", "content": "Which sport?"},
    {"role": "assistant", "content": "Football, mostly."},
]}


def test_chat_trains_exactly_assistant_content_and_end_of_turn(smol_tok):
    (ex,), cut = encode(CHAT, "chat", smol_tok, 512)
    assert not cut
    assert trained_segments(smol_tok, ex) == ["Hello there!<|im_end|>", "Football, mostly.<|im_end|>"]
    # the whole row is the template's rendering, unchanged
    assert smol_tok.decode(ex.input_ids) == smol_tok.apply_chat_template(CHAT["messages"], tokenize=False)


def test_chat_trains_end_of_turn_even_when_it_is_not_eos(smol_tok):
    tok = copy.deepcopy(smol_tok)
    tok.eos_token = "<|endoftext|>"  # end of turn (<|im_end|>) now differs from EOS
    assert tok.eos_token_id != tok.convert_tokens_to_ids("<|im_end|>")
    (ex,), _ = encode(CHAT, "chat", tok, 512)
    assert trained_segments(tok, ex) == ["Hello there!<|im_end|>", "Football, mostly.<|im_end|>"]


def test_chat_without_system_message_masks_the_default_system_prompt(smol_tok):
    row = {"messages": CHAT["messages"][1:3]}
    (ex,), _ = encode(row, "chat", smol_tok, 512)
    assert "You are a helpful AI assistant" in smol_tok.decode(ex.input_ids)
    assert trained_segments(smol_tok, ex) == ["Hello there!<|im_end|>"]


def test_alpaca_trains_response_and_eos(smol_tok):
    row = {"instruction": "Name a colour.", "input": "", "output": "Blue."}
    (ex,), _ = encode(row, "alpaca", smol_tok, 512)
    assert trained_segments(smol_tok, ex) == ["Blue." + smol_tok.eos_token]
    prompt = ALPACA_PROMPT.format(instruction="Name a colour.")
    assert smol_tok.decode(ex.input_ids).startswith(prompt)
    row2 = {"instruction": "Add.", "input": "2 and 3", "output": "5"}
    (ex2,), _ = encode(row2, "alpaca", smol_tok, 512)
    assert smol_tok.decode(ex2.input_ids) == ALPACA_PROMPT_INPUT.format(**row2) + "5" + smol_tok.eos_token
    assert trained_segments(smol_tok, ex2) == ["5" + smol_tok.eos_token]


def test_pad_equal_to_eos_keeps_the_real_eos_trained(smol_tok):
    assert smol_tok.pad_token_id == smol_tok.eos_token_id  # SmolLM2: pad = eos = <|im_end|>
    short, _ = encode({"instruction": "Say hi.", "input": "", "output": "Hi."}, "alpaca", smol_tok, 512)
    long_, _ = encode({"instruction": "Say a lot.", "input": "", "output": "Hi. " * 30}, "alpaca", smol_tok, 512)
    batch = collate([short[0], long_[0]], pad_id=smol_tok.pad_token_id, packed=False)
    n = len(short[0].input_ids)
    eos = smol_tok.eos_token_id
    assert batch["input_ids"][0, n - 1] == eos and batch["labels"][0, n - 1] == eos  # real EOS: trained
    assert (batch["input_ids"][0, n:] == eos).all() and (batch["labels"][0, n:] == IGNORE).all()  # pads: not
    assert batch["attention_mask"][0].sum() == n


def test_truncation_cuts_at_max_length_and_reports_it(smol_tok):
    row = {"instruction": "Count.", "input": "", "output": " ".join(str(i) for i in range(100))}
    (full,), cut = encode(row, "alpaca", smol_tok, 4096)
    assert not cut
    (ex,), cut = encode(row, "alpaca", smol_tok, 60)
    assert cut and ex.input_ids == full.input_ids[:60] and ex.labels == full.labels[:60]


def test_truncation_that_leaves_nothing_to_train_drops_the_example(smol_tok):
    row = {"instruction": "A long question " * 20, "input": "", "output": "Yes."}
    examples, cut = encode(row, "alpaca", smol_tok, 30)
    assert examples == [] and cut


def test_first_label_is_never_trained(smol_tok):
    # a text example's first token has no previous token in its own example to be predicted from
    examples, _ = encode({"text": "one two three four five six seven"}, "text", smol_tok, 4)
    assert all(ex.labels[0] == IGNORE and ex.labels[1:] == ex.input_ids[1:] for ex in examples)


def test_text_is_chunked_with_stride_max_length_plus_eos(smol_tok):
    text = "The quick brown fox jumps over the lazy dog. " * 20
    ids = smol_tok(text)["input_ids"] + [smol_tok.eos_token_id]
    examples, cut = encode({"text": text}, "text", smol_tok, 32)
    assert not cut
    tail = [len(ids) % 32] if len(ids) % 32 > 1 else []
    assert [len(e.input_ids) for e in examples] == [32] * (len(ids) // 32) + tail
    assert sum((e.input_ids for e in examples), []) == ids[: sum(len(e.input_ids) for e in examples)]


def test_classification_gives_class_index_and_no_token_labels(smol_tok):
    (ex,), cut = encode({"text": "Stocks rose.", "label": "business"}, "classification", smol_tok, 512,
                        label_names=("business", "sport"))
    assert ex.label == 0 and ex.labels == [] and not cut
    assert ex.input_ids == smol_tok("Stocks rose.")["input_ids"]
    with pytest.raises(ValueError, match="'tech', not one of the known labels: business, sport"):
        encode({"text": "x", "label": "tech"}, "classification", smol_tok, 512, label_names=("business", "sport"))


def test_chat_template_that_is_not_prefix_stable_is_refused(smol_tok):
    tok = copy.deepcopy(smol_tok)
    # renders the number of messages first: a prefix renders differently from the whole conversation
    tok.chat_template = "{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="prefix"):
        encode(CHAT, "chat", tok, 512)


def test_unknown_format_is_refused(smol_tok):
    with pytest.raises(ValueError, match="format='xml': must be one of alpaca, chat, text, classification"):
        encode({"text": "x"}, "xml", smol_tok, 512)
