"""DoRA (Liu et al. 2024): LoRA's direction update plus a trainable per-row magnitude. Torch only, no I/O.

    out = m / ||W0 + s B A||  *  (W0 x + s B A x)  + bias          (norm per output row, detached)

Hugging Face PEFT forms the (d_out, d_in) matrix B A every step (through an identity matrix of size
d_in) to take its row norms. Here the norm is expanded so only (d_out, r) products are needed:
||w_i + s b_i A||^2 = ||w_i||^2 + 2 s b_i . (W0 A^T)_i + s^2 b_i (A A^T) b_i^T  (``merging.dora_norm_factored``),
and one fused autograd function applies the scale, saving a single (tokens, d_out) tensor for m's gradient
(``DoraLinearFn``; with dropout ``DoraDropoutFn``, which saves neither the dropped input nor, on a 4-bit
base, a dequantized weight). Both run under torch.autocast (dtypes: :mod:`slimtune.layers.amp`).
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from slimtune import merging as merge_math
from slimtune.layers.amp import accumulate_dtype, compute_dtype, narrower, no_autocast
from slimtune.layers.lora import SAVE_MASK_ON, LoraLinear, drop_probability, keep_mask, new_seed


def dense_weight(base: nn.Module) -> Tensor:
    """The base weight as (d_out, d_in), whatever the storage: nn.Linear, GPT-2 Conv1D (stored
    transposed) or a quantized linear (dequantized on the fly)."""
    if isinstance(base, Conv1D):
        return base.weight.T
    if isinstance(base, nn.Linear):
        return base.weight
    return base.dequantize()


def stored_weight(base: nn.Module) -> Tensor | None:
    """The base weight as (d_out, d_in) when it is stored as a float tensor (a view of the parameter,
    free to save for backward), else None (a quantized base: its weight must be dequantized)."""
    w = getattr(base, "weight", None)
    return dense_weight(base) if isinstance(w, Tensor) and w.is_floating_point() else None


class DoraLinearFn(torch.autograd.Function):
    """out = c * (base_out - bias + s (x A^T) B^T) + bias with c = m / norm (norm a constant).

    Saves x (as given), A, B, the (T, r) product and y = the un-scaled adapted output (T, d_out, in the
    narrower of the compute and output dtypes), needed for dL/dm = sum_t g * y / norm. Gradients for
    base_out (g * c) flow on into the base layer's own backward, which hands the bias its share; the
    bias's explicit term here gives it the rest, g * (1 - c), so a trainable bias gets sum_t g in all.
    """

    @staticmethod
    def forward(ctx, x: Tensor, base_out: Tensor, A: Tensor, B: Tensor, m: Tensor, norm: Tensor,
                bias: Tensor | None, scale: float) -> Tensor:
        dev = x.device.type
        cd = compute_dtype(dev, A.dtype)
        acc = accumulate_dtype(cd)
        with no_autocast(dev):
            x2 = x.reshape(-1, x.shape[-1])  # (T, d_in)
            out2 = base_out.reshape(-1, base_out.shape[-1]).to(cd)  # (T, d_out)
            xa = (x2.to(cd) @ A.to(cd).T) * scale  # (T, r)
            y = torch.addmm(out2 - bias.to(cd) if bias is not None else out2, xa, B.to(cd).T)  # (W0 + sBA) x
            c = m.to(acc) / norm.to(acc)  # (d_out,)
            out = y.to(acc) * c
            if bias is not None:
                out = out + bias.to(acc)
        ctx.save_for_backward(x, A, B, xa, y.to(narrower(cd, base_out.dtype)), c, norm)
        ctx.scale, ctx.cd, ctx.dtypes = scale, cd, (base_out.dtype, m.dtype, getattr(bias, "dtype", None))
        return out.to(base_out.dtype).view(base_out.shape)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, A, B, xa, y, c, norm = ctx.saved_tensors
        need_x, need_out, need_A, need_B, need_m, _, need_bias = ctx.needs_input_grad[:7]
        out_dtype, m_dtype, bias_dtype = ctx.dtypes
        g2 = g.reshape(-1, g.shape[-1]).to(c.dtype)  # (T, d_out)
        grad_m = ((g2 * y.to(c.dtype)).sum(0) / norm.to(c.dtype)).to(m_dtype) if need_m else None
        grad_bias = (g2 * (1 - c)).sum(0).to(bias_dtype) if need_bias else None
        gy = g2 * c  # (T, d_out): gradient reaching (W0 + sBA) x
        grad_x, grad_A, grad_B = _lora_grads(gy.to(ctx.cd), x, A, B, xa, ctx.scale, None, need_x, need_A, need_B)
        grad_out = gy.to(out_dtype).view(g.shape) if need_out else None
        return grad_x, grad_out, grad_A, grad_B, grad_m, None, grad_bias, None


class DoraDropoutFn(torch.autograd.Function):
    """DoRA with dropout, as PEFT: the rescaled base term uses the dropped input too,

        out = base_out + (c - 1) W0 xd + c s (xd A^T) B^T = base_out + c y - W0 xd,   y = (W0 + sBA) xd,

    xd = dropout(x) with the seeded keep-mask of :func:`slimtune.layers.lora.keep_mask`. Saves x, the
    (T, r) product, y and at most the 1-byte mask: never xd nor W0. ``weight`` is the dense base weight
    when it is a stored float tensor (saving a parameter costs nothing), or None for a quantized base,
    which ``layer.dequantize()`` recomputes in backward.
    """

    @staticmethod
    def forward(ctx, x: Tensor, base_out: Tensor, A: Tensor, B: Tensor, m: Tensor, norm: Tensor,
                weight: Tensor | None, scale: float, p: float, seed: int, layer: nn.Module) -> Tensor:
        dev = x.device.type
        cd = compute_dtype(dev, A.dtype)
        acc = accumulate_dtype(cd)
        with no_autocast(dev):
            x2 = x.reshape(-1, x.shape[-1])  # (T, d_in)
            keep = keep_mask(x2, p, seed)  # (T, d_in) bool
            xd = x2.to(cd) * keep * (1.0 / (1.0 - drop_probability(p)))  # not saved
            W0 = (dense_weight(layer) if weight is None else weight).to(cd)  # (d_out, d_in), not saved
            z = xd @ W0.T  # (T, d_out): W0 xd
            del W0
            xa = (xd @ A.to(cd).T) * scale  # (T, r)
            y = torch.addmm(z, xa, B.to(cd).T)  # (T, d_out)
            c = m.to(acc) / norm.to(acc)  # (d_out,)
            out = base_out.reshape(-1, base_out.shape[-1]).to(acc) + c * y.to(acc) - z.to(acc)
        saved_keep = (keep,) if dev in SAVE_MASK_ON else ()
        ctx.save_for_backward(x, A, B, xa, y.to(narrower(cd, base_out.dtype)), c, norm, weight, *saved_keep)
        ctx.scale, ctx.p, ctx.seed, ctx.cd, ctx.layer = scale, p, seed, cd, layer
        ctx.dtypes = (m.dtype, None if weight is None else weight.dtype)
        return out.to(base_out.dtype).view(base_out.shape)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, A, B, xa, y, c, norm, weight, *saved_keep = ctx.saved_tensors
        need_x, need_out, need_A, need_B, need_m, _, need_w = ctx.needs_input_grad[:7]
        m_dtype, w_dtype = ctx.dtypes
        cd, x2 = ctx.cd, x.reshape(-1, x.shape[-1])
        g2 = g.reshape(-1, g.shape[-1]).to(c.dtype)  # (T, d_out)
        grad_m = ((g2 * y.to(c.dtype)).sum(0) / norm.to(c.dtype)).to(m_dtype) if need_m else None
        keep = saved_keep[0] if saved_keep else keep_mask(x2, ctx.p, ctx.seed)
        k = 1.0 / (1.0 - drop_probability(ctx.p))
        gz = (g2 * (c - 1)).to(cd)  # (T, d_out): gradient reaching W0 xd
        grad_x, grad_A, grad_B = _lora_grads((g2 * c).to(cd), x, A, B, xa, ctx.scale * k, keep,
                                             need_x, need_A, need_B)
        if need_x:
            W0 = (dense_weight(ctx.layer) if weight is None else weight).to(cd)  # recomputed, never saved
            grad_x = grad_x + ((gz @ W0) * keep * k).view(x.shape).to(x.dtype)
        grad_w = (gz.T @ (x2.to(cd) * keep * k)).to(w_dtype) if need_w else None
        return grad_x, (g if need_out else None), grad_A, grad_B, grad_m, None, grad_w, None, None, None, None


def _lora_grads(gl: Tensor, x: Tensor, A: Tensor, B: Tensor, xa: Tensor, scale: float, mask: Tensor | None,
                need_x: bool, need_A: bool, need_B: bool) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of s * (xm A^T) B^T for x, A and B given gl (T, d_out) reaching it, computed in gl's dtype.

    ``xm = x * mask`` (mask: (T, d_in) bool dropout keep-mask, None without dropout; dropout's 1/(1-p)
    is folded into ``scale``); ``xa`` is the saved (T, r) product. Each gradient comes back in its
    input's dtype.
    """
    cd = gl.dtype
    grad_B = (gl.T @ xa).to(B.dtype) if need_B else None  # (d_out, r)
    grad_x = grad_A = None
    if need_x or need_A:
        gxa = (gl @ B.to(cd)) * scale  # (T, r)
        x2 = x.reshape(-1, x.shape[-1]).to(cd)
        if need_A:
            grad_A = (gxa.T @ (x2 * mask if mask is not None else x2)).to(A.dtype)  # (r, d_in)
        if need_x:
            gx = gxa @ A.to(cd)  # (T, d_in)
            grad_x = (gx * mask if mask is not None else gx).view(x.shape).to(x.dtype)
    return grad_x, grad_A, grad_B


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
        """||W0 + s B A|| per row (fp32, detached) from (d_out, r) products only (autocast off: the
        norm is a constant of the step, computed once in fp32)."""
        with torch.no_grad(), no_autocast(self.lora_A.device.type):
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
        norm = self.factored_norm(base_layer)  # (d_out,) fp32, detached
        if self.training and self.dropout > 0:
            return DoraDropoutFn.apply(x, base_out, self.lora_A, self.lora_B, self.magnitude, norm,
                                       stored_weight(base_layer),
                                       self.scale, self.dropout, new_seed(), base_layer)
        bias = getattr(base_layer, "bias", None)
        return DoraLinearFn.apply(x, base_out, self.lora_A, self.lora_B, self.magnitude, norm, bias, self.scale)

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
