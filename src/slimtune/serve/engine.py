"""Continuous batching: requests for any adapters decode together, and new ones join between decoding steps.

The running batch keeps one KV cache (transformers ``DynamicCache``) whose rows are left-padded to a common
length, with an attention mask marking the padding and per-row positions counted from each row's first real
token (what ``transformers`` ``generate`` does for a left-padded batch). One ``step()``:

1. decodes one token for every running row (one forward, each row through its own adapter);
2. prefills the waiting requests together and joins them to the batch (both caches left-padded to one length
   and concatenated along the batch);
3. drops the rows that finished (EOS, a stop string, max_tokens, the context limit) or were cancelled.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache

from slimtune.serve.sampling import SamplingParams, find_stop, next_token, safe_prefix


@dataclass(frozen=True)
class Completion:
    """A finished request: text (stop string excluded), generated token ids, why it stopped, token counts."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (max_tokens or the context limit)
    prompt_tokens: int


@dataclass
class Request:
    """One completion to run. ``sink(kind, value)`` (optional) receives ("delta", text) as text becomes final,
    then ("done", Completion) or ("error", exception), called from the engine's thread."""

    prompt: str | Sequence[int]
    adapter: str | None
    params: SamplingParams
    sink: Callable[[str, Any], None] | None = None
    cancelled: bool = False
    prompt_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    streamed: int = 0
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    done: threading.Event = field(default_factory=threading.Event)
    outcome: Any = None

    def result(self) -> Completion:
        """The Completion once done; re-raises the error the request failed with."""
        self.done.wait()
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome

    def emit(self, kind: str, value: Any) -> None:
        if kind in ("done", "error"):
            self.outcome = value
            self.done.set()
        if self.sink is not None:
            self.sink(kind, value)


class Engine:
    """Decodes many requests in one batch on a ``MultiAdapterModel``; not thread-safe except ``add``."""

    def __init__(self, model: Any, max_batch: int = 32) -> None:
        self.model, self.max_batch = model, max_batch
        self.tokenizer = model.tokenizer
        self.waiting: collections.deque[Request] = collections.deque()  # append/popleft are thread-safe
        self.running: list[Request] = []
        self.cache: DynamicCache | None = None
        self.mask: Tensor | None = None  # (B, L) 1 = real token, 0 = left padding
        self.next_ids: Tensor | None = None  # (B,) the token each row feeds next
        self.admitting: list[Request] = []  # taken from the queue, not yet in the batch
        self.outbox: list[tuple[Request, str, Any]] = []  # events of this step, delivered after the lock
        self.eos = eos_ids(model.base, self.tokenizer)
        self.context = model.context_length

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, request: Request) -> None:
        """Queue ``request``; it joins the batch at the next step. ValueError for a prompt that cannot run."""
        request.prompt_ids = self.encode(request.prompt)
        if not request.prompt_ids:
            raise ValueError("prompt: must hold at least one token")
        if request.params.stop and self.tokenizer is None:
            raise ValueError("stop: stop strings need a tokenizer")
        seed = request.params.seed
        request.generator = torch.Generator(device=self.model.device)
        request.generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,))))
        self.waiting.append(request)

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt: text prompts need a tokenizer; pass token ids or MultiAdapterModel("
                                 "base, tokenizer)")
            return list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        return [int(t) for t in prompt]

    def step(self) -> None:
        """One decoding step for the running rows, then admit the waiting requests, then drop finished rows."""
        try:
            with self.model.lock:
                if self.running:
                    self._decode()
                self._admit()
                self._drop_finished()
        except Exception as e:  # noqa: BLE001 - a failing step fails its requests, never the serving thread
            for r in self.running + self.admitting:
                if r.finish_reason is None:
                    self.emit(r, "error", e)
            self.admitting = []
            self.running, self.cache, self.mask, self.next_ids = [], None, None, None
        finally:
            self.flush()

    def emit(self, r: Request, kind: str, value: Any) -> None:
        self.outbox.append((r, kind, value))

    def flush(self) -> None:
        """Deliver this step's events outside the model lock: a sink may take other locks (the registry's,
        whose holder may be waiting for the model lock to load an adapter)."""
        events, self.outbox = self.outbox, []
        for r, kind, value in events:
            r.emit(kind, value)

    # -- the two kinds of forward -------------------------------------------------------
    def _decode(self) -> None:
        positions = self.mask.sum(1, keepdim=True)  # (B, 1): real tokens before the new one
        self.mask = F.pad(self.mask, (0, 1), value=1)
        out = self.model.forward(self.next_ids[:, None], [r.adapter for r in self.running],
                                 attention_mask=self.mask, position_ids=positions, cache=self.cache,
                                 use_cache=True, logits_to_keep=1)
        self._sample(self.running, out.logits[:, -1])

    def _admit(self) -> None:
        new = []
        while self.waiting and len(self.running) + len(new) < self.max_batch:
            r = self.waiting.popleft()
            if r.cancelled:
                self.emit(r, "error", RuntimeError("cancelled"))
                continue
            if r.adapter is not None and r.adapter not in self.model.slots:
                self.emit(r, "error", self.model_error(r.adapter))
                continue
            new.append(r)
        if not new:
            return
        self.admitting = new
        length = max(len(r.prompt_ids) for r in new)
        device = self.model.device
        ids = torch.tensor([[0] * (length - len(r.prompt_ids)) + r.prompt_ids for r in new], device=device)
        mask = torch.tensor([[0] * (length - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in new],
                            device=device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)  # (n, L): each row counts from its first real token
        cache = DynamicCache()
        out = self.model.forward(ids, [r.adapter for r in new], attention_mask=mask, position_ids=positions,
                                 cache=cache, use_cache=True, logits_to_keep=1)
        self._join(new, cache, mask)
        self.admitting = []
        self._sample(new, out.logits[:, -1])

    def model_error(self, adapter: str) -> Exception:
        from slimtune.serve.model import UnknownAdapter

        return UnknownAdapter(f"adapter {adapter!r} is not loaded; loaded: {sorted(self.model.slots) or 'none'}")

    def _join(self, new: list[Request], cache: DynamicCache, mask: Tensor) -> None:
        """Append the prefilled rows to the batch: caches and masks left-padded to one length, concatenated."""
        zeros = torch.zeros(len(new), dtype=torch.long, device=mask.device)
        if self.cache is None:
            self.running, self.cache, self.mask, self.next_ids = list(new), cache, mask, zeros
            return
        length = max(self.mask.shape[1], mask.shape[1])
        for old_layer, new_layer in zip(self.cache.layers, cache.layers):
            old_layer.keys = torch.cat([left_pad(old_layer.keys, length), left_pad(new_layer.keys, length)])
            old_layer.values = torch.cat([left_pad(old_layer.values, length), left_pad(new_layer.values, length)])
        self.mask = torch.cat([F.pad(self.mask, (length - self.mask.shape[1], 0)),
                               F.pad(mask, (length - mask.shape[1], 0))])
        self.next_ids = torch.cat([self.next_ids, zeros])
        self.running += new

    # -- after each forward -----------------------------------------------------------
    def _sample(self, rows: list[Request], logits: Tensor) -> None:
        """Choose each row's next token (logits (n, V) for ``rows``, the last rows of the batch), record it."""
        offset = len(self.running) - len(rows)
        greedy = logits.argmax(-1).tolist()  # one call for every greedy row, not one per row
        chosen = [greedy[i] if r.params.temperature == 0 else next_token(logits[i], r.params, r.generator)
                  for i, r in enumerate(rows)]
        self.next_ids[offset:] = torch.tensor(chosen, dtype=self.next_ids.dtype, device=self.next_ids.device)
        for r, t in zip(rows, chosen):
            self._record(r, t)

    def _record(self, r: Request, token: int) -> None:
        if token in self.eos:
            return self._finish(r, "stop")
        r.token_ids.append(token)
        if self.tokenizer is not None:
            r.text = self.tokenizer.decode(r.token_ids, skip_special_tokens=True)
            cut = find_stop(r.text, r.params.stop)
            if cut is not None:
                r.text = r.text[:cut]
                return self._finish(r, "stop")
        if len(r.token_ids) >= r.params.max_tokens or len(r.prompt_ids) + len(r.token_ids) >= self.context:
            return self._finish(r, "length")
        end = safe_prefix(r.text, r.params.stop)
        if end > r.streamed:
            self.emit(r, "delta", r.text[r.streamed:end])
            r.streamed = end

    def _finish(self, r: Request, reason: str) -> None:
        r.finish_reason = reason
        if len(r.text) > r.streamed:
            self.emit(r, "delta", r.text[r.streamed:])
            r.streamed = len(r.text)
        self.emit(r, "done", Completion(r.text, list(r.token_ids), reason, len(r.prompt_ids)))

    def _drop_finished(self) -> None:
        keep = [i for i, r in enumerate(self.running) if r.finish_reason is None and not r.cancelled]
        for i, r in enumerate(self.running):
            if r.cancelled and r.finish_reason is None:
                self.emit(r, "error", RuntimeError("cancelled"))
        if len(keep) == len(self.running):
            return
        if not keep:
            self.running, self.cache, self.mask, self.next_ids = [], None, None, None
            return
        idx = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(idx)
        self.mask, self.next_ids = self.mask[idx], self.next_ids[idx]
        self.running = [self.running[i] for i in keep]
        first = int(self.mask.any(0).nonzero()[0])  # columns that are padding in every row: cut them
        if first:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
            self.mask = self.mask[:, first:]


def left_pad(t: Tensor, length: int) -> Tensor:
    """(B, H, L, D) cache tensor zero-padded on the left of L to ``length``."""
    return F.pad(t, (0, 0, length - t.shape[2], 0))


def eos_ids(base: Any, tokenizer: Any) -> set[int]:
    """The token ids that end a generation: the generation config's (as transformers' generate), else the
    tokenizer's EOS."""
    ids = getattr(getattr(base, "generation_config", None), "eos_token_id", None)
    if ids is None and tokenizer is not None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return set()
    return {int(i) for i in ([ids] if isinstance(ids, int) else ids)}
