"""Scores a run reports before and after training: eval loss, accuracy, exact-match answers, forgetting.

All functions run the model in eval mode under ``torch.no_grad`` and put back its training flag.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)


def eval_loss(model: nn.Module, batches: Sequence[dict[str, Tensor]]) -> float:
    """Token-weighted mean cross-entropy over ``batches`` (each a collated dict with ``labels``)."""
    total, count = 0.0, 0
    with evaluating(model):
        for batch in batches:
            labels = batch["labels"]
            n = int((labels[:, 1:] != -100).sum())  # the model shifts labels by one inside
            if n == 0:
                continue
            out = model(**batch, use_cache=False)
            total += float(out.loss) * n
            count += n
    return total / count if count else math.nan


def accuracy(model: nn.Module, batches: Sequence[dict[str, Tensor]]) -> float:
    """Classification accuracy: argmax of the logits against ``labels`` (class indices, (B,))."""
    right = seen = 0
    with evaluating(model):
        for batch in batches:
            logits = model(**batch).logits  # (B, num_labels)
            right += int((logits.argmax(-1) == batch["labels"]).sum())
            seen += len(batch["labels"])
    return right / seen if seen else math.nan


def generate_answers(model: nn.Module, tokenizer: Any, conversations: Sequence[list[dict[str, str]]],
                     max_new_tokens: int = 8) -> list[str]:
    """Greedy replies to each conversation (the chat template's generation prompt appended), stopping at the
    end-of-turn token as well as EOS."""
    stops = {tokenizer.eos_token_id}
    end = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    if end is not None:
        stops.add(end)
    answers = []
    with evaluating(model):
        for messages in conversations:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)["input_ids"].to(model.device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=sorted(stops), pad_token_id=tokenizer.pad_token_id,
                                 use_cache=True)
            answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return answers


def exact_match(answers: Sequence[str], targets: Sequence[str], normalise: Callable[[str], str] | None = None) -> float:
    """Share of answers equal to their target after normalising (lower case, trailing punctuation stripped)."""
    norm = normalise or (lambda s: s.strip().lower().rstrip(".!"))
    return sum(norm(a) == norm(t) for a, t in zip(answers, targets)) / max(len(targets), 1)


def text_loss(model: nn.Module, blocks: Tensor, batch: int = 8) -> float:
    """Mean causal-LM loss per predicted token over fixed-length token ``blocks`` (n, T), ``batch`` blocks per
    forward: the forgetting check on general text, and the held-out loss of ``benchmarks/methods_compare.py``."""
    blocks = blocks.to(model.device)
    batches = [{"input_ids": blocks[i:i + batch], "labels": blocks[i:i + batch]} for i in range(0, len(blocks), batch)]
    return eval_loss(model, batches)
