"""Encoders: one validated, normalized row (see ``rows.py``) -> token ids and per-token labels.

Labels are built token by token from the rendered text, never from a pad/attention mask, so a tokenizer whose
pad token is its EOS still trains the real EOS. ``-100`` means "no loss". Every example's first label is -100:
it has no previous token in the example to be predicted from, and in a packed row the previous position belongs
to another example (the model shifts labels by one inside its loss).

- ``alpaca``: the Stanford Alpaca prompt (instruction, optional input) is context; the response and EOS are trained.
- ``chat``: ``tokenizer.apply_chat_template``; assistant spans are found by rendering the conversation prefix by
  prefix (template-agnostic). The assistant's content and the turn's end token (the first special token after the
  content, e.g. SmolLM2's ``<|im_end|>``; trained even when it is not ``tokenizer.eos_token``) are trained; the
  template's trailing whitespace after the end token is not.
- ``text``: the document's tokens plus EOS, cut into ``max_length`` pieces (stride ``max_length``); every token is
  trained except each piece's first. Chunking is not truncation.
- ``classification``: the text's tokens (truncated to ``max_length``) and a class index; ``labels`` is ``[]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

IGNORE = -100

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


@dataclass(frozen=True)
class Example:
    """One training example: ``input_ids`` (L,), ``labels`` (L,) with -100 = no loss ([] for classification),
    ``label`` the class index for classification."""

    input_ids: list[int]
    labels: list[int]
    label: int | None = None


def eos_id(tokenizer) -> int:
    """The tokenizer's EOS id; ValueError when it has none (alpaca and text need one to teach stopping)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token: alpaca and text formats need one to mark the end")
    return int(tokenizer.eos_token_id)


def finish(ids: list[int], labels: list[int], max_length: int) -> tuple[list[Example], bool]:
    """Cut at ``max_length`` and mask the first label; drops an example left with nothing to train."""
    truncated = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    if labels:
        labels[0] = IGNORE
    if all(lab == IGNORE for lab in labels):
        return [], truncated  # the response fell entirely past max_length: nothing to learn from
    return [Example(ids, labels)], truncated


def encode_alpaca(row: dict, tokenizer, max_length: int) -> tuple[list[Example], bool]:
    template = ALPACA_PROMPT_INPUT if row.get("input") else ALPACA_PROMPT
    prompt = tokenizer(template.format(**row))["input_ids"]  # the tokenizer's own specials (e.g. BOS) lead
    response = tokenizer(row["output"], add_special_tokens=False)["input_ids"] + [eos_id(tokenizer)]
    return finish(prompt + response, [IGNORE] * len(prompt) + response, max_length)


def special_ids(tokenizer) -> set[int]:
    """Ids of special tokens (the named ones and added tokens flagged special)."""
    ids = set(tokenizer.all_special_ids)
    for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(tok, "special", False):
            ids.add(int(i))
    return ids


def render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The full rendering and the character span of each assistant turn in it.

    A turn's span starts where ``render(messages[:i], generation_prompt=True)`` ends and stops where
    ``render(messages[:i+1])`` ends. Raises ValueError when the template is not prefix-stable (a prefix's
    rendering is not a prefix of the whole), since then no template-agnostic span exists.
    """
    full = render(tokenizer, messages, False)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        start = render(tokenizer, messages[:i], True) if i else ""
        upto = render(tokenizer, messages[: i + 1], False)
        if not (full.startswith(upto) and upto.startswith(start)):
            raise ValueError(
                "the chat template renders a conversation prefix differently from the whole conversation, so "
                "assistant turns cannot be located; use a prefix-stable template (or the alpaca format)"
            )
        spans.append((len(start), len(upto)))
    return full, spans


def trained_positions(starts: Sequence[int], ids: Sequence[int], span: tuple[int, int],
                      specials: set[int]) -> list[int]:
    """Token positions to train for one assistant span: its content through the first special token after it."""
    inside = [j for j, s in enumerate(starts) if span[0] <= s < span[1]]
    out: list[int] = []
    seen_content = False
    for j in inside:
        out.append(j)
        if ids[j] in specials:
            if seen_content:
                return out  # the end-of-turn token: trained, and nothing after it (template whitespace)
            out.pop()  # a special token before the content (a role header in the span) is context
        else:
            seen_content = True
    return out  # a template with no end token: the whole span


def encode_chat(row: dict, tokenizer, max_length: int) -> tuple[list[Example], bool]:
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("the chat format needs a fast tokenizer (token offsets locate the assistant turns)")
    full, spans = assistant_spans(tokenizer, row["messages"])
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, starts = list(enc["input_ids"]), [a for a, _ in enc["offset_mapping"]]
    labels = [IGNORE] * len(ids)
    specials = special_ids(tokenizer)
    for span in spans:
        for j in trained_positions(starts, ids, span, specials):
            labels[j] = ids[j]
    return finish(ids, labels, max_length)


def encode_text(row: dict, tokenizer, max_length: int) -> tuple[list[Example], bool]:
    ids = list(tokenizer(row["text"])["input_ids"])
    eos = eos_id(tokenizer)
    if not ids or ids[-1] != eos:
        ids.append(eos)
    out = []
    for a in range(0, len(ids), max_length):
        piece = ids[a : a + max_length]
        if len(piece) >= 2:  # a lone token has nothing to predict
            out.append(Example(piece, [IGNORE] + piece[1:]))
    return out, False


def class_index(label: str | int, label_names: Sequence[str] | None) -> int:
    """The class index of ``label``: its position in ``label_names``, or the integer itself when names are None.

    Raises ValueError (the caller turns it into a BadRow) when the label is not among the names.
    """
    if label_names is None:
        if isinstance(label, int):
            return label
        raise ValueError(f"is {label!r}, but no label names were given to map it to a class index")
    name = str(label)
    if name not in label_names:
        shown = ", ".join(label_names[:10]) + (", ..." if len(label_names) > 10 else "")
        raise ValueError(f"is {label!r}, not one of the known labels: {shown}")
    return list(label_names).index(name)


def encode_classification(row: dict, tokenizer, max_length: int, label_names) -> tuple[list[Example], bool]:
    ids = list(tokenizer(row["text"])["input_ids"])
    return [Example(ids[:max_length], [], class_index(row["label"], label_names))], len(ids) > max_length


def encode(row: dict, fmt: str, tokenizer, max_length: int,
           label_names: Sequence[str] | None = None) -> tuple[list[Example], bool]:
    """Encode one normalized row (``rows.check_row``'s output) -> (examples, truncated).

    ``text`` rows may give several examples (chunks); an alpaca/chat row truncated so far that nothing is left
    to train gives none (and ``truncated`` is True). Raises ValueError on an unknown format, a label not in
    ``label_names``, a tokenizer without EOS (alpaca/text) or a chat template that is not prefix-stable.
    """
    if max_length < 2:
        raise ValueError(f"max_length={max_length}: must be at least 2")
    if fmt == "alpaca":
        return encode_alpaca(row, tokenizer, max_length)
    if fmt == "chat":
        return encode_chat(row, tokenizer, max_length)
    if fmt == "text":
        return encode_text(row, tokenizer, max_length)
    if fmt == "classification":
        return encode_classification(row, tokenizer, max_length, label_names)
    raise ValueError(f"format={fmt!r}: must be one of alpaca, chat, text, classification")
