"""Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning"). Torch only.

n trainable "virtual token" embeddings are prepended to the input embeddings; the model is frozen.
``prompt_inputs`` is the pure rewrite of a forward call's arguments, used by the forward pre-hook that
``slimtune.methods.prompt.inject_prompt`` registers, so a plain Hugging Face model (and its
``generate()``) runs with the prompt:

    input_ids (B, T)       -> inputs_embeds (B, n + T, d) = [prompt ; embed(input_ids)]   (prefill only)
    attention_mask (B, T)  -> (B, n + T), ones for the virtual tokens                     (every step)
    labels (B, T)          -> (B, n + T), -100 for the virtual tokens (no loss on them)
    position_ids, cache_position, token_type_ids -> dropped, so the model numbers positions 0..n+T-1
        itself from the cache length (as Hugging Face PEFT does)
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import Tensor, nn


class PromptEmbedding(nn.Module):
    """The n x d virtual-token table. ``disabled`` makes the hook pass inputs through unchanged."""

    def __init__(self, num_virtual_tokens: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Parameter(torch.zeros(num_virtual_tokens, dim))
        self.disabled = False

    @property
    def num_virtual_tokens(self) -> int:
        return self.embedding.shape[0]

    def adapter_params(self) -> Iterator[nn.Parameter]:
        return iter((self.embedding,))

    def init_random(self, like: Tensor, generator: torch.Generator | None = None) -> None:
        """N(0, std of the embedding table), so virtual tokens start at the scale of real ones."""
        with torch.no_grad():
            std = float(like.float().std())
            self.embedding.copy_(torch.randn(self.embedding.shape, generator=generator) * std)

    def init_from_tokens(self, word_embeddings: nn.Module, token_ids: list[int]) -> None:
        """The embeddings of ``token_ids``, repeated or cut to n (as PEFT's TEXT init)."""
        if not token_ids:
            raise ValueError("prompt.init_text tokenizes to no tokens")
        n = self.num_virtual_tokens
        ids = (token_ids * (n // len(token_ids) + 1))[:n]
        weight = word_embeddings.weight
        with torch.no_grad():
            self.embedding.copy_(word_embeddings(torch.tensor(ids, device=weight.device)).float())

    def file_tensors(self) -> dict[str, Tensor]:
        return {"prompt_embeddings": self.embedding}


def _prefill(kwargs: dict[str, Any]) -> bool:
    cache = kwargs.get("past_key_values")
    if cache is None:
        return True
    get_len = getattr(cache, "get_seq_length", None)
    return (get_len() if callable(get_len) else cache[0][0].shape[-2]) == 0


def prompt_inputs(kwargs: dict[str, Any], prompt: Tensor, word_embeddings: nn.Module) -> dict[str, Any]:
    """Rewrite a forward call's keyword arguments to prepend ``prompt`` (n, d). Returns a new dict."""
    kw = dict(kwargs)
    n = prompt.shape[0]
    ids, embeds = kw.pop("input_ids", None), kw.pop("inputs_embeds", None)
    batch = (ids if ids is not None else embeds).shape[0]
    mask = kw.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        kw["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)  # (B, n + T)
    for key in ("position_ids", "cache_position", "token_type_ids"):
        kw.pop(key, None)
    if not _prefill(kw):  # decoding: the virtual tokens are already in the cache
        kw["input_ids" if ids is not None else "inputs_embeds"] = ids if ids is not None else embeds
        return kw
    if embeds is None:
        embeds = word_embeddings(ids)  # (B, T, d)
    p = prompt.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)  # (B, n, d)
    kw["inputs_embeds"] = torch.cat([p, embeds], dim=1)  # (B, n + T, d)
    labels = kw.get("labels")
    if labels is not None and labels.dim() == 2 and labels.shape[1] == embeds.shape[1]:  # token labels only
        kw["labels"] = torch.cat([labels.new_full((batch, n), -100), labels], dim=1)
    return kw
