"""One base model serving many LoRA adapters at once: each batch row picks its own adapter (or none).

``MultiAdapterModel(base)`` wraps the base's Linear-like layers that some loaded adapter targets in
``MultiLoraLinear`` and gives each loaded adapter a *slot*. ``forward(input_ids, adapters=[...])`` runs one
batch whose row n uses ``adapters[n]`` (a name, or None for the base). Loading reads and checks everything
first and then writes the slot under ``lock``, which every forward holds: a forward never sees half an adapter.
"""

from __future__ import annotations

import os
import re
import threading
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from slimtune.modules import set_submodule
from slimtune.serve.adapters import BottleneckWeights, ServableAdapter, linear_layers, read_servable
from slimtune.serve.layer import NO_ADAPTER, MultiLoraLinear, RowAdapters, RowPlan

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class UnknownAdapter(KeyError):
    """A request names an adapter that is not loaded."""

    def __str__(self) -> str:  # KeyError quotes its argument; the message is already a sentence
        return str(self.args[0])


def check_name(name: object, field: str = "name") -> str:
    """``name`` if it is a valid adapter name (letters, digits, ``._-``, 1-64 chars, no leading dot); else
    ValueError naming ``field`` and the value."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ValueError(f"{field}={name!r}: adapter names are 1-64 letters, digits, '.', '_' or '-', starting "
                         "with a letter or digit")
    return name


class MultiAdapterModel:
    """A causal LM plus any number of loaded LoRA adapters, mixed per row in one batch.

    ``base``: a transformers causal LM (any dtype; a slimtune NF4 model works too), put in eval mode.
    ``tokenizer``: needed by ``generate`` for text prompts and stop strings.
    """

    def __init__(self, base: nn.Module, tokenizer: Any = None) -> None:
        self.base = base.eval()
        self.tokenizer = tokenizer
        self.lock = threading.RLock()
        self.state = RowAdapters()
        self.slots: dict[str, int] = {}
        self.adapters: dict[str, ServableAdapter] = {}
        self._bases = linear_layers(base)

    # -- adapters --------------------------------------------------------------------------
    def load(self, name: str, path: str | os.PathLike) -> ServableAdapter:
        """Load the adapter folder ``path`` (slimtune- or PEFT-written) as ``name``.

        Raises ValueError for a bad or taken name, AdapterFileError for a bad folder, AdapterRefused for an
        adapter that cannot be batched (reason given), BaseMismatch for another base or quantization scheme.
        On error nothing changes.
        """
        check_name(name)
        if name in self.slots:
            raise ValueError(f"name={name!r}: an adapter of that name is already loaded; unload it first")
        adapter = read_servable(path, self.base, self._bases)  # all reading and checking, outside the lock
        with self.lock:
            if name in self.slots:
                raise ValueError(f"name={name!r}: an adapter of that name is already loaded; unload it first")
            slot = next(i for i in range(len(self.slots) + 1) if i not in self.slots.values())
            for module, w in adapter.modules.items():
                if isinstance(w, BottleneckWeights):
                    self._wrapper(module).set_bottleneck(slot, w.down, w.down_bias, w.up, w.up_bias, w.scale,
                                                         w.nonlinearity)
                else:
                    self._wrapper(module).set_slot(slot, w.A, w.B, w.scale, w.column_scale)
            self.slots[name], self.adapters[name] = slot, adapter
        return adapter

    def unload(self, name: str) -> None:
        """Forget adapter ``name`` (its slot is zeroed and reused). UnknownAdapter if it is not loaded."""
        with self.lock:
            if name not in self.slots:
                raise UnknownAdapter(f"adapter {name!r} is not loaded; loaded: {sorted(self.slots) or 'none'}")
            slot = self.slots.pop(name)
            del self.adapters[name]
            for module in self.base.modules():
                if isinstance(module, MultiLoraLinear):
                    module.clear_slot(slot)

    def _wrapper(self, name: str) -> MultiLoraLinear:
        module = self.base.get_submodule(name)
        if not isinstance(module, MultiLoraLinear):
            module = MultiLoraLinear(module, self.state)
            set_submodule(self.base, name, module)
        return module

    def slot_list(self, adapters: Sequence[str | None]) -> list[int]:
        """The slot of each row (NO_ADAPTER for None). UnknownAdapter for a name that is not loaded."""
        out = []
        for a in adapters:
            if a is not None and a not in self.slots:
                raise UnknownAdapter(f"adapter {a!r} is not loaded; loaded: {sorted(self.slots) or 'none'}")
            out.append(NO_ADAPTER if a is None else self.slots[a])
        return out

    @property
    def context_length(self) -> int:
        """The longest sequence (prompt + completion) the base model takes."""
        return int(getattr(self.base.config, "max_position_embeddings", 1 << 30))

    @property
    def device(self) -> torch.device:
        return next(self.base.parameters()).device

    # -- compute ---------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, input_ids: Tensor, adapters: Sequence[str | None] | None = None, **kwargs: Any) -> Any:
        """The base model's forward on ``input_ids`` (N, T), row n through ``adapters[n]`` (None: the base).

        Extra keyword arguments (attention_mask, position_ids, cache, ...) go to the base model.
        """
        with self.lock:
            rows = None if adapters is None else self.slot_list(adapters)
            if rows is not None and len(rows) != input_ids.shape[0]:
                raise ValueError(f"adapters has {len(rows)} entries for {input_ids.shape[0]} rows")
            # grouped once here, for every layer of this forward
            self.state.plan = None if rows is None else RowPlan.of(rows, self.device)
            try:
                return self.base(input_ids=input_ids, **kwargs)
            finally:
                self.state.plan = None

    def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]], adapters: Sequence[str | None] | None = None,
                 max_tokens: int | Sequence[int] = 16, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, stop: Sequence[str] = ()) -> list[Any]:
        """Complete each prompt with its adapter (``adapters[i]``; None or absent: the base), all in one batch.

        Prompts are text (needs ``tokenizer``) or token-id lists; ``max_tokens`` one int or one per prompt;
        temperature 0 is greedy. Returns one ``engine.Completion`` per prompt (``text``, ``token_ids``,
        ``finish_reason``: "stop" for EOS or a stop string, "length" for max_tokens).
        """
        from slimtune.serve.engine import Engine, Request
        from slimtune.serve.sampling import SamplingParams

        adapters = list(adapters) if adapters is not None else [None] * len(prompts)
        if len(adapters) != len(prompts):
            raise ValueError(f"adapters has {len(adapters)} entries for {len(prompts)} prompts")
        limits = [max_tokens] * len(prompts) if isinstance(max_tokens, int) else list(max_tokens)
        engine = Engine(self)
        requests = [Request(p, a, SamplingParams(m, temperature, top_p, None if seed is None else seed + i,
                                                 tuple(stop)))
                    for i, (p, a, m) in enumerate(zip(prompts, adapters, limits))]
        for r in requests:
            engine.add(r)
        while engine.busy:
            engine.step()
        return [r.result() for r in requests]
