"""A deterministic, resumable batch sampler: every epoch is a permutation that is a pure function of
(seed, epoch), and the position in the data is just (epoch, pos).

Batches run across epoch boundaries: when an epoch has fewer than ``batch_size`` indices left, the batch
is completed from the next epoch's permutation, so every batch is full (micro-batches stay equal in size,
which keeps loss / grad_accum an exact mean) and no example is dropped.
"""

from __future__ import annotations

import random
from typing import Any


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The permutation of ``range(n)`` for ``epoch``: Python's Mersenne Twister seeded with the string
    ``"<seed>:<epoch>"`` (string seeds are hashed with SHA-512, the same on every platform and run), so it
    is independent of the global RNGs the training draws from."""
    order = list(range(n))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


def _check_int(name: str, value: Any, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name}={value!r}: must be an integer >= {lo}")


class EpochSampler:
    """Indices of ``n`` examples in batches of ``batch_size``, shuffled per epoch from ``seed``.

    ``state()`` is a JSON-able dict ``{"epoch", "pos", "n", "batch_size", "seed"}``; ``load_state`` restores
    the position and raises ValueError when the state is malformed or was written for another n,
    batch_size or seed (resuming on other data would silently train on a different order).
    """

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        _check_int("n", n, 1)
        _check_int("batch_size", batch_size, 1)
        _check_int("seed", seed, 0)
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.pos = 0, 0
        self._order: list[int] | None = None  # the permutation of self.epoch, built on first use

    def _current(self) -> list[int]:
        if self._order is None:
            self._order = epoch_order(self.n, self.seed, self.epoch)
        return self._order

    def next_batch(self) -> list[int]:
        """The next ``batch_size`` indices (crossing into the next epoch when this one runs out)."""
        out: list[int] = []
        while len(out) < self.batch_size:
            take = min(self.batch_size - len(out), self.n - self.pos)
            out.extend(self._current()[self.pos:self.pos + take])
            self.pos += take
            if self.pos == self.n:
                self.epoch, self.pos, self._order = self.epoch + 1, 0, None
        return out

    def state(self) -> dict[str, int]:
        """Where the sampler stands: the next batch starts at index ``pos`` of epoch ``epoch``'s order."""
        return {"epoch": self.epoch, "pos": self.pos, "n": self.n, "batch_size": self.batch_size,
                "seed": self.seed}

    def load_state(self, d: dict) -> None:
        """Restore a :meth:`state`. Raises ValueError naming the field for a bad or mismatched value."""
        check_sampler_state(d, self.n, self.batch_size, self.seed)
        if d["epoch"] != self.epoch:
            self._order = None
        self.epoch, self.pos = d["epoch"], d["pos"]


def check_sampler_state(d: Any, n: int, batch_size: int, seed: int) -> None:
    """Raise ValueError unless ``d`` is a sampler state for this (n, batch_size, seed) with a valid position."""
    if not isinstance(d, dict):
        raise ValueError(f"sampler state {d!r}: must be an object with epoch, pos, n, batch_size, seed")
    for key, want in (("n", n), ("batch_size", batch_size), ("seed", seed)):
        if d.get(key) != want:
            raise ValueError(f"sampler state {key}={d.get(key)!r}: this run has {key}={want} "
                             "(resume with the same data, batch size and seed)")
    _check_int("sampler state epoch", d.get("epoch"), 0)
    pos = d.get("pos")
    if isinstance(pos, bool) or not isinstance(pos, int) or not 0 <= pos < n:
        raise ValueError(f"sampler state pos={pos!r}: must be an integer in [0, {n})")
