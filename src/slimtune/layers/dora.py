"""DoRA (Liu et al. 2024): LoRA's direction update plus a trainable per-row magnitude. Torch only, no I/O.

    out = m / ||W0 + s B A||  *  (W0 x + s B A x)  + bias          (norm per output row, detached)

Hugging Face PEFT forms the (d_out, d_in) matrix B A every step (through an identity matrix of size
d_in) to take its row norms. Here the norm is expanded so only (d_out, r) products are needed:
||w_i + s b_i A||^2 = ||w_i||^2 + 2 s b_i . (W0 A^T)_i + s^2 b_i (A A^T) b_i^T  (``merging.dora_norm_factored``),
and one fused autograd function applies the scale, saving a single (tokens, d_out) tensor for m's gradient.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from slimtune import merging as merge_math
from slimtune.layers.lora import LoraLinear, _dropout


def dense_weight(base: nn.Module) -> Tensor:
    """The base weight as (d_out, d_in), whatever the storage: nn.Linear, GPT-2 Conv1D (stored
    transposed) or a quantized linear (dequantized on the fly)."""
    if isinstance(base, Conv1D):
        return base.weight.T
    if isinstance(base, nn.Linear):
        return base.weight
    return base.dequantize()


class _DoraLinearFn(torch.autograd.Function):
    """out = c * (base_out - bias + s (x A^T) B^T) + bias with c = m / norm (norm a constant).

    Saves x, A, B, the (T, r) product and y = the un-scaled adapted output (T, d_out), needed for
    dL/dm = sum_t g * y / norm. Gradients for base_out flow on into the base layer's own backward.
    """

    @staticmethod
    def forward(ctx, x: Tensor, base_out: Tensor, A: Tensor, B: Tensor, m: Tensor, norm: Tensor,
                bias: Tensor | None, scale: float) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (T, d_in)
        out2 = base_out.reshape(-1, base_out.shape[-1])  # (T, d_out)
        xa = (x2 @ A.T) * scale  # (T, r)
        y = out2 - bias.to(out2.dtype) if bias is not None else out2
        y = torch.addmm(y, xa.to(out2.dtype), B.T.to(out2.dtype))  # (T, d_out): (W0 + sBA) x
        c = (m.float() / norm).to(out2.dtype)  # (d_out,)
        out = y * c
        if bias is not None:
            out = out + bias.to(out2.dtype)
        ctx.save_for_backward(x, A, B, xa, y, c, norm)
        ctx.scale = scale
        return out.view(base_out.shape)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, A, B, xa, y, c, norm = ctx.saved_tensors
        need_x, need_out, need_A, need_B, need_m = ctx.needs_input_grad[:5]
        g2 = g.reshape(-1, g.shape[-1])  # (T, d_out)
        gy = g2 * c  # (T, d_out): gradient reaching (W0 + sBA) x
        grad_m = ((g2.float() * y.float()).sum(0) / norm).to(B.dtype) if need_m else None
        gyb = gy.to(B.dtype)
        grad_B = gyb.T @ xa if need_B else None  # (d_out, r)
        grad_x = grad_A = None
        if need_x or need_A:
            gxa = (gyb @ B) * ctx.scale  # (T, r)
            if need_A:
                grad_A = gxa.T @ x.reshape(-1, x.shape[-1])  # (r, d_in)
            if need_x:
                grad_x = (gxa @ A).view(x.shape).to(x.dtype)
        grad_out = gy.view(g.shape) if need_out else None
        return grad_x, grad_out, grad_A, grad_B, grad_m, None, None, None


class DoraLinear(LoraLinear):
    """DoRA for a Linear-like base: LoRA's A (r, d_in), B (d_out, r) plus magnitude m (d_out,).

    m starts at ||W0|| per row (B = 0), so step 0 equals the base. Merging replaces W0 by
    m / ||V|| * V (V = W0 + s B A) and keeps the norm to undo it; ``delta_weight`` is W' - W0.
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 init: str = "kaiming", fan_in_fan_out: bool = False) -> None:
        W0 = dense_weight(base)  # (d_out, d_in)
        super().__init__(W0.shape[1], W0.shape[0], r, alpha, dropout, use_rslora, init, fan_in_fan_out)
        self.magnitude = nn.Parameter(self._norm(base).detach().clone())
        self._merged_norm: Tensor | None = None  # norm of V when merged, to unmerge exactly
        self._w0_sq_cache: tuple[tuple, Tensor] | None = None  # not state: recomputed when W0 changes

    def init_magnitude(self, base: nn.Module) -> None:
        """Reset m to ||W0 + s B A|| (after an init that changed A, B or W0), so step 0 equals the base."""
        with torch.no_grad():
            self.magnitude.copy_(self._norm(base))

    def _norm(self, base: nn.Module) -> Tensor:
        with torch.no_grad():
            return merge_math.dora_norm(dense_weight(base), self.lora_A, self.lora_B, self.scale)

    def adapter_params(self) -> Iterator[nn.Parameter]:
        return iter((self.lora_A, self.lora_B, self.magnitude))

    def file_tensors(self) -> dict[str, Tensor]:
        return {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B, "lora_magnitude_vector": self.magnitude}

    def factored_norm(self, base: nn.Module) -> Tensor:
        """||W0 + s B A|| per row (fp32, detached) from (d_out, r) products only."""
        with torch.no_grad():
            W0 = dense_weight(base)  # (d_out, d_in)
            W32 = W0 if W0.dtype == torch.float32 else W0.float()
            w0_at = W32 @ self.lora_A.float().T  # (d_out, r)
            return merge_math.dora_norm_factored(self._w0_sq(base, W32), w0_at, self.lora_A, self.lora_B,
                                                 self.scale)

    def _w0_sq(self, base: nn.Module, W32: Tensor) -> Tensor:
        """(d_out,) squared row norms of the frozen W0, cached until the stored weight changes (its data
        pointer or in-place version counter: loading, merging, moving to another device)."""
        w = base.weight
        key = (w.data_ptr(), w._version, tuple(w.shape), w.dtype)
        if self._w0_sq_cache is None or self._w0_sq_cache[0] != key:
            self._w0_sq_cache = (key, torch.linalg.vector_norm(W32, dim=1).square())
        return self._w0_sq_cache[1]

    def forward(self, x: Tensor, base_out: Tensor, base_layer: nn.Module) -> Tensor:
        norm = self.factored_norm(base_layer)
        bias = getattr(base_layer, "bias", None)
        x = x.to(self.lora_A.dtype)
        if self.training and self.dropout > 0:
            return self._forward_dropout(x, base_out, base_layer, norm, bias)
        return _DoraLinearFn.apply(x, base_out, self.lora_A, self.lora_B, self.magnitude, norm, bias, self.scale)

    def _forward_dropout(self, x: Tensor, base_out: Tensor, base_layer: nn.Module, norm: Tensor,
                         bias: Tensor | None) -> Tensor:
        # As PEFT: with dropout the rescaled base term uses the dropped input too, W0 dropout(x).
        seed = int(torch.randint(0, 2**62, (1,)).item())
        xd = _dropout(x.reshape(-1, x.shape[-1]), self.dropout, seed).view(x.shape)
        base_d = F.linear(xd.to(base_out.dtype), dense_weight(base_layer).to(base_out.dtype))  # (..., d_out)
        c = (self.magnitude / norm.to(self.magnitude.dtype)).to(base_out.dtype)
        lora = (xd @ self.lora_A.T) @ self.lora_B.T * self.scale
        return base_out + (c - 1) * base_d + c * lora.to(base_out.dtype)

    # -- merging -------------------------------------------------------------------------------
    def delta_weight(self, base_layer: nn.Module) -> Tensor:
        """W' - W0 in the base's storage layout, fp32; valid while this adapter is not merged."""
        W0 = dense_weight(base_layer)
        merged, _ = merge_math.dora_merged(W0.float(), self.lora_A, self.lora_B, self.scale, self.magnitude)
        delta = merged - W0.float()
        return delta.T if self.fan_in_fan_out else delta

    def merged_weight(self, weight: Tensor, base_layer: nn.Module) -> Tensor:
        W = weight.T if self.fan_in_fan_out else weight  # (d_out, d_in)
        new, self._merged_norm = merge_math.dora_merged(W, self.lora_A, self.lora_B, self.scale, self.magnitude)
        return new.T if self.fan_in_fan_out else new

    def unmerged_weight(self, weight: Tensor, base_layer: nn.Module) -> Tensor:
        if self._merged_norm is None:
            raise RuntimeError("DoRA adapter is not merged; nothing to unmerge")
        W = weight.T if self.fan_in_fan_out else weight
        old = merge_math.dora_unmerged(W, self.lora_A, self.lora_B, self.scale, self.magnitude, self._merged_norm)
        self._merged_norm = None
        return old.T if self.fan_in_fan_out else old
