"""AdamW with both moments stored in 8 bits, blockwise (Dettmers et al., 2022, https://arxiv.org/abs/2110.02861).

Each moment is cut into blocks of 256 values; a block keeps its float32 absolute maximum and one uint8 code
per value against the dynamic map (signed for the first moment, unsigned for the second). An update
dequantizes a parameter's moments to float32, applies AdamW, and quantizes them again, so optimizer state
costs 2 bytes per parameter instead of 8. Tensors under ``min_8bit_size`` values keep float32 moments.

The arithmetic is bitsandbytes' CPU path (``AdamW8bit``) step for step, so on CPU the two agree bit for
bit (checked in ``tests/optim/test_adamw8bit.py``); it runs unchanged on any device.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import Tensor

from slimtune.quant.blockwise import NESTED_BLOCK_SIZE, dequantize_blockwise, dynamic_map, quantize_blockwise

BLOCK = NESTED_BLOCK_SIZE  # 256 values per block of optimizer state


def _check(name: str, value: float, lo: float, hi: float = math.inf, hi_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and lo <= value and (
        value < hi if hi_open else value <= hi)
    if not ok:
        raise ValueError(f"{name}={value!r}: must be a number in [{lo}, {hi}{')' if hi_open else ']'}")


class AdamW8bit(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) with 8-bit blockwise moments.

    State per parameter: ``step`` (int) and either ``exp_avg`` / ``exp_avg_sq`` (float32, small tensors) or
    ``exp_avg_codes`` / ``exp_avg_absmax`` / ``exp_avg_sq_codes`` / ``exp_avg_sq_absmax`` (uint8 codes of the
    parameter's shape, float32 (ceil(numel / 256),) maxima). ``state_dict()`` / ``load_state_dict()`` keep
    those dtypes, so a resumed run continues exactly where it stopped.
    Raises ValueError for a bad hyperparameter (naming it) and RuntimeError for sparse gradients.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, min_8bit_size: int = 4096) -> None:
        _check("lr", lr, 0.0)
        _check("eps", eps, 0.0)
        _check("weight_decay", weight_decay, 0.0)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas={betas!r}: must be a pair (beta1, beta2)")
        _check("betas[0]", betas[0], 0.0, 1.0, hi_open=True)
        _check("betas[1]", betas[1], 0.0, 1.0, hi_open=True)
        if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or min_8bit_size < 0:
            raise ValueError(f"min_8bit_size={min_8bit_size!r}: must be a non-negative integer")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, min_8bit_size=min_8bit_size)
        super().__init__(params, defaults)
        self._maps: dict[str, tuple[Tensor, Tensor]] = {}

    def _qmaps(self, device: torch.device) -> tuple[Tensor, Tensor]:
        key = str(device)
        if key not in self._maps:
            self._maps[key] = (dynamic_map(True).to(device), dynamic_map(False).to(device))
        return self._maps[key]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW8bit does not support sparse gradients")
                state = self.state[p]
                if not state:
                    _init_state(state, p, group["min_8bit_size"])
                state["step"] += 1
                if "exp_avg" in state:
                    _update_fp32(p, p.grad, state, group)
                else:
                    _update_8bit(p, p.grad, state, group, *self._qmaps(p.device))
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but the state keeps its saved dtypes (torch would cast uint8 codes to the param dtype)."""
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for idx, saved in state_dict["state"].items():
            p = params[idx]
            self.state[p] = {k: v.to(p.device).clone() if torch.is_tensor(v) else v for k, v in saved.items()}

    def state_nbytes(self) -> int:
        """Bytes held by the optimizer state (for memory reports)."""
        return sum(v.numel() * v.element_size() for st in self.state.values() for v in st.values()
                   if torch.is_tensor(v))


def _init_state(state: dict, p: Tensor, min_8bit_size: int) -> None:
    state["step"] = 0
    if p.numel() < min_8bit_size:
        state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
        return
    blocks = -(-p.numel() // BLOCK)
    for name in ("exp_avg", "exp_avg_sq"):
        state[f"{name}_codes"] = torch.zeros(p.shape, dtype=torch.uint8, device=p.device)
        state[f"{name}_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)


def _update_fp32(p: Tensor, grad: Tensor, state: dict, group: dict) -> None:
    """bitsandbytes' 32-bit Adam: eps is scaled by the second bias correction inside the denominator."""
    beta1, beta2 = group["betas"]
    lr, eps, wd, step = group["lr"], group["eps"], group["weight_decay"], state["step"]
    g = grad.float()
    p32 = p.float()
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m.mul_(beta1).add_(g, alpha=1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    c1, c2 = 1.0 - beta1**step, math.sqrt(1.0 - beta2**step)
    if wd > 0.0:
        p32.mul_(1.0 - lr * wd)
    p32.add_(m / (v.sqrt() + eps * c2), alpha=-lr * c2 / c1)
    p.copy_(p32)


def _update_8bit(p: Tensor, grad: Tensor, state: dict, group: dict, qmap1: Tensor, qmap2: Tensor) -> None:
    """Dequantize both moments, one AdamW step in float32, quantize them again (block 256)."""
    beta1, beta2 = group["betas"]
    lr, eps, wd, step = group["lr"], group["eps"], group["weight_decay"], state["step"]
    m = dequantize_blockwise(state["exp_avg_codes"], state["exp_avg_absmax"], qmap1, BLOCK)
    v = dequantize_blockwise(state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"], qmap2, BLOCK)
    g = grad.float()
    p32 = p.float()
    m.mul_(beta1).add_(g, alpha=1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    c1, c2 = 1.0 - beta1**step, math.sqrt(1.0 - beta2**step)
    denom = (v.sqrt() / c2).add_(eps)
    if wd > 0.0:
        p32.mul_(1.0 - lr * wd)
    p32.addcdiv_(m, denom, value=-lr / c1)
    p.copy_(p32)
    state["exp_avg_codes"], state["exp_avg_absmax"] = quantize_blockwise(m, qmap1, BLOCK)
    state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"] = quantize_blockwise(v, qmap2, BLOCK)
