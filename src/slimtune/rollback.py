"""Undo for in-place model edits, so an operation that fails part-way leaves the model as it was.

``inject``, ``inject_prompt`` and ``load_adapter`` change a model in place: they wrap modules, freeze
parameters and register configs. Each records how to undo its structural edits here; on any error the
edits are undone newest first, every parameter's ``requires_grad`` flag and the model's slimtune
attributes are restored. Parameter *values* are never snapshotted (that would double the memory):
callers write base weights only after every check has passed.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from torch import nn

MODEL_ATTRS = ("slimtune_configs", "slimtune_active")  # the model-level state slimtune keeps
_ABSENT = object()


class Rollback:
    """An undo log for ``model``: ``add(fn)`` records an undo step; ``restore()`` runs them all."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._flags = [(p, p.requires_grad) for p in model.parameters()]
        self._attrs = {a: model.__dict__.get(a, _ABSENT) for a in MODEL_ATTRS}
        self._undo: list[Callable[[], None]] = []

    def add(self, undo: Callable[[], None]) -> None:
        self._undo.append(undo)

    def restore(self) -> None:
        """Undo the recorded edits newest first, then restore flags and attributes as snapshotted."""
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        for p, flag in self._flags:
            p.requires_grad_(flag)
        for a, value in self._attrs.items():
            if value is _ABSENT:
                self.model.__dict__.pop(a, None)
            else:
                self.model.__dict__[a] = value


@contextlib.contextmanager
def rollback_on_error(model: nn.Module) -> Iterator[Rollback]:
    """Yield a Rollback for ``model``; if the block raises, restore the model and re-raise."""
    log = Rollback(model)
    try:
        yield log
    except BaseException:
        log.restore()
        raise
