"""Choosing the next token (greedy, temperature, nucleus) and finding stop strings: pure functions."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    """How one request decodes. temperature 0 is greedy; top_p keeps the smallest set of most likely tokens
    whose probabilities sum to at least top_p (Holtzman et al. 2019); seed fixes the draws."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens!r}: must be a positive integer")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) \
                or self.temperature < 0:
            raise ValueError(f"temperature={self.temperature!r}: must be a number >= 0 (0 is greedy)")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r}: must be in (0, 1]")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop={list(self.stop)!r}: stop strings must be non-empty strings")


def next_token(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The next token id from ``logits`` (V,): argmax when temperature is 0, else a draw from the
    temperature-scaled distribution restricted to the top-p nucleus."""
    if params.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)  # (V,)
    if params.top_p < 1:
        probs = nucleus(probs, params.top_p)
    return int(torch.multinomial(probs, 1, generator=generator))


def nucleus(probs: Tensor, top_p: float) -> Tensor:
    """``probs`` (V,) with every token outside the top-p nucleus zeroed, renormalised. The nucleus is the most
    likely tokens up to and including the first whose cumulative probability reaches top_p."""
    sorted_p, order = probs.sort(descending=True)
    before = sorted_p.cumsum(0) - sorted_p  # probability mass strictly ahead of each token
    keep_sorted = before < top_p  # the first token is always kept
    keep = torch.zeros_like(keep_sorted).scatter(0, order, keep_sorted)
    kept = probs * keep
    return kept / kept.sum()


def find_stop(text: str, stop: tuple[str, ...]) -> int | None:
    """The index where the earliest stop string starts in ``text``, or None."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else None


def safe_prefix(text: str, stop: tuple[str, ...]) -> int:
    """How much of ``text`` can be streamed now: all but a tail that could still become a stop string, and
    never a trailing replacement character (half of a multi-byte character still being decoded)."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    for s in stop:
        for k in range(min(len(s) - 1, end), 0, -1):  # the longest tail of text that begins s
            if text[end - k:end] == s[:k]:
                end -= k
                break
    return max(end, 0)
