"""Keep an optimizer's state in CPU memory and bring it to the parameter's device only for the update.

On a GPU this frees the optimizer state's memory (8 bytes per trained value for AdamW, 2 for AdamW8bit)
for activations, at the cost of two transfers per step; the transfers go parameter by parameter, so at
most one parameter's state is on the device at a time. Pinned host memory makes the copies asynchronous.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor


class OffloadedOptimizer(torch.optim.Optimizer):
    """Wraps ``optimizer_class(params, **kwargs)``; its state lives on ``offload_device`` between steps.

    ``state_dict()`` / ``load_state_dict()`` are the inner optimizer's (state on the offload device), so a
    checkpoint taken with or without offloading resumes in either. Parameters with no gradient are skipped,
    exactly as the inner optimizer skips them.
    """

    def __init__(self, params: Iterable, optimizer_class: type[torch.optim.Optimizer] | None = None,
                 offload_device: str | torch.device = "cpu", **kwargs: Any) -> None:
        if optimizer_class is None:
            from slimtune.optim.adamw8bit import AdamW8bit
            optimizer_class = AdamW8bit
        if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
            raise ValueError(f"optimizer_class={optimizer_class!r}: must be a torch.optim.Optimizer subclass")
        self.inner = optimizer_class(params, **kwargs)
        self.offload_device = torch.device(offload_device)
        super().__init__(self.inner.param_groups, self.inner.defaults)
        self._share()

    def _share(self) -> None:
        # one set of groups and state for both objects: lr schedulers and checkpoints see the same numbers
        self.param_groups = self.inner.param_groups
        self.state = self.inner.state

    def _move_state(self, to_param: bool) -> None:
        pin = to_param is False and self.offload_device.type == "cpu" and torch.cuda.is_available()
        for p, st in self.state.items():
            dev = p.device if to_param else self.offload_device
            for k, v in st.items():
                if torch.is_tensor(v) and v.device != dev:
                    moved = v.to(dev, non_blocking=True)
                    st[k] = moved.pin_memory() if pin and not moved.is_pinned() else moved
        if to_param is False and torch.cuda.is_available():
            torch.cuda.synchronize()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        self._move_state(to_param=True)
        try:
            return self.inner.step(closure)
        finally:
            self._move_state(to_param=False)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none)

    def load_state_dict(self, state_dict: dict) -> None:
        self.inner.load_state_dict(state_dict)
        self._share()
        self._move_state(to_param=False)

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def state_devices(self) -> set[str]:
        """The devices holding state tensors now (``{'cpu'}`` between steps)."""
        return {str(v.device) for st in self.state.values() for v in st.values() if isinstance(v, Tensor)}
