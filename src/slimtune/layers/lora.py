"""LoRA adapters for Linear-like, Embedding and Conv layers. Torch modules only: no I/O.

Each adapter is one object owning its A and B. It never touches the base weight; merging is done
by ``AdaptedLayer`` through ``delta_weight`` (pure maths in ``slimtune.merging``).
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimtune import merging as merge_math
from slimtune.layers.amp import compute_dtype, no_autocast


def init_lora_A(A: Tensor, init: str, r: int) -> None:
    """kaiming: uniform as nn.Linear's default (PEFT's default); gaussian: N(0, 1/r) (LoRA paper)."""
    if init == "kaiming":
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    elif init == "gaussian":
        nn.init.normal_(A, std=1.0 / r)
    else:
        raise ValueError(f"init={init!r}: must be one of kaiming, gaussian")


SAVE_MASK_ON = ("cpu",)  # device types where saving the dropout mask beats regenerating it


class LoraLinearFn(torch.autograd.Function):
    """base_out + s * (dropout(x) @ A^T) @ B^T, fused, saving x, the (tokens, r) product and at most a
    boolean keep-mask.

    Hugging Face PEFT applies ``nn.Dropout`` to x before A, so autograd keeps a dropped copy of x
    (tokens x d_in, 2-4 bytes per element) per adapted layer. Here the mask comes from a seed: on CUDA,
    where random numbers are nearly free, backward regenerates it and nothing extra is saved; on CPU,
    where the generator is serial and slow, the 1-byte mask is saved instead. The 1/(1-p) rescaling is
    folded into the (tokens, r) factor instead of a full-size multiply.

    Dtypes: the maths runs in ``compute_dtype`` (autocast's dtype under autocast, else A's dtype) in
    forward and backward alike; x is saved as given (no up-cast copy: it is usually the very tensor the
    base layer saved) and cast again in backward; gradients come back in each input's own dtype.
    """

    @staticmethod
    def forward(ctx, x: Tensor, base_out: Tensor, A: Tensor, B: Tensor, scale: float, p: float,
                seed: int) -> Tensor:
        dev = x.device.type
        cd = compute_dtype(dev, A.dtype)
        with no_autocast(dev):
            x2 = x.reshape(-1, x.shape[-1])  # (T, d_in)
            keep = keep_mask(x2, p, seed) if p > 0 else None  # (T, d_in) bool
            xd = x2.to(cd) * keep if keep is not None else x2.to(cd)  # dropped, not yet rescaled
            xa = (xd @ A.to(cd).T) * (scale / (1.0 - drop_probability(p)))  # (T, r)
            del xd
            out2 = base_out.reshape(-1, base_out.shape[-1])  # (T, d_out)
            out = torch.addmm(out2.to(cd), xa, B.to(cd).T).to(base_out.dtype)  # (T, d_out)
        save_keep = keep is not None and dev in SAVE_MASK_ON
        ctx.save_for_backward(x, A, B, xa, *((keep,) if save_keep else ()))
        ctx.scale, ctx.p, ctx.seed, ctx.cd = scale, p, seed, cd
        return out.view(base_out.shape)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, A, B, xa, *saved_keep = ctx.saved_tensors
        need_x, need_out, need_A, need_B = ctx.needs_input_grad[:4]
        cd = ctx.cd
        g2 = g.reshape(-1, g.shape[-1]).to(cd)  # (T, d_out)
        grad_B = (g2.T @ xa).to(B.dtype) if need_B else None  # (d_out, r)
        grad_x = grad_A = None
        if need_x or need_A:
            gxa = (g2 @ B.to(cd)) * (ctx.scale / (1.0 - drop_probability(ctx.p)))  # (T, r)
            x2 = x.reshape(-1, x.shape[-1])
            keep = saved_keep[0] if saved_keep else (keep_mask(x2, ctx.p, ctx.seed) if ctx.p > 0 else None)
            if need_A:
                xc = x2.to(cd)
                grad_A = (gxa.T @ (xc * keep if keep is not None else xc)).to(A.dtype)  # (r, d_in)
            if need_x:
                gx = gxa @ A.to(cd)  # (T, d_in)
                if keep is not None:
                    gx = gx.mul_(keep)
                grad_x = gx.view(x.shape).to(x.dtype)
        return grad_x, (g if need_out else None), grad_A, grad_B, None, None, None


def keep_mask(x2: Tensor, p: float, seed: int) -> Tensor:
    """Boolean keep-mask shaped like ``x2``, a pure function of ``seed`` (so backward can regenerate it).

    Each element draws 16 random bits (four per 64-bit word, about 2.5x faster on CPU than a float per
    element); it is dropped with probability ``drop_probability(p)``, i.e. p rounded to a multiple of 2^-16.
    """
    gen = torch.Generator(device=x2.device)
    gen.manual_seed(seed)
    n = x2.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x2.device).random_(-2**63, None, generator=gen)
    bits = words.view(torch.int16)[:n].view(x2.shape)  # uniform on [-32768, 32767]
    return bits >= round(p * 65536) - 32768


def new_seed() -> int:
    """A dropout seed drawn from torch's global generator (so ``torch.manual_seed`` fixes the masks)."""
    return int(torch.randint(0, 2**62, (1,)).item())


def drop_probability(p: float) -> float:
    """The dropout probability ``keep_mask`` realises for a requested ``p`` (within 7.7e-6 of it)."""
    return round(p * 65536) / 65536


class _LoraBase(nn.Module):
    """Shared hyperparameters and the adapter protocol's bookkeeping."""

    mergeable = True

    def __init__(self, r: int, alpha: float, dropout: float, use_rslora: bool) -> None:
        super().__init__()
        self.r, self.alpha, self.dropout, self.use_rslora = r, alpha, dropout, use_rslora
        self.scale = merge_math.lora_scale(alpha, r, use_rslora)

    def adapter_params(self) -> Iterator[nn.Parameter]:
        return iter((self.lora_A, self.lora_B))

    def file_tensors(self) -> dict[str, Tensor]:
        return {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B}

    def load_file_tensors(self, tensors: dict[str, Tensor]) -> None:
        for key, param in zip(self.file_tensors(), self.adapter_params()):
            t = tensors[key]
            if t.shape != param.shape:
                raise ValueError(f"{key}: file has shape {tuple(t.shape)}, this layer needs "
                                 f"{tuple(param.shape)} (different rank or base model?)")
            with torch.no_grad():
                param.copy_(t)

    def merged_weight(self, weight: Tensor, base_layer: nn.Module) -> Tensor:
        return merge_math.merge_into(weight, self.delta_weight(base_layer))

    def unmerged_weight(self, weight: Tensor, base_layer: nn.Module) -> Tensor:
        return merge_math.unmerge_from(weight, self.delta_weight(base_layer))

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scale={self.scale:g}, dropout={self.dropout}"


class LoraLinear(_LoraBase):
    """LoRA for any Linear-like layer (nn.Linear, GPT-2 Conv1D, 4-bit linear).

    lora_A: (r, d_in), lora_B: (d_out, r). ``fan_in_fan_out`` marks a base whose weight is
    stored (d_in, d_out), which only changes the layout of ``delta_weight``.
    """

    def __init__(self, d_in: int, d_out: int, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, init: str = "kaiming", fan_in_fan_out: bool = False) -> None:
        super().__init__(r, alpha, dropout, use_rslora)
        self.fan_in_fan_out = fan_in_fan_out
        self.lora_A = nn.Parameter(torch.empty(r, d_in))
        self.lora_B = nn.Parameter(torch.zeros(d_out, r))
        init_lora_A(self.lora_A.data, init, r)

    def forward(self, x: Tensor, base_out: Tensor, base_layer: nn.Module) -> Tensor:
        p = self.dropout if self.training else 0.0
        seed = new_seed() if p > 0 else 0
        return LoraLinearFn.apply(x, base_out, self.lora_A, self.lora_B, self.scale, p, seed)

    def delta_weight(self, base_layer: nn.Module) -> Tensor:
        return merge_math.linear_delta(self.lora_A, self.lora_B, self.scale, self.fan_in_fan_out)


class LoraEmbedding(_LoraBase):
    """LoRA for nn.Embedding, in PEFT's layout: A (r, num_embeddings) = 0, B (dim, r) ~ N(0, 1).

    Embeddings start with A = 0 (not B) as in loralib, so the product is still zero at step 0.
    Dropout does not apply to token indices.
    """

    def __init__(self, num_embeddings: int, dim: int, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, init: str = "kaiming") -> None:
        super().__init__(r, alpha, 0.0, use_rslora)
        self.lora_A = nn.Parameter(torch.zeros(r, num_embeddings))
        self.lora_B = nn.Parameter(torch.randn(dim, r))

    def forward(self, x: Tensor, base_out: Tensor, base_layer: nn.Module) -> Tensor:
        after_a = F.embedding(x, self.lora_A.T, padding_idx=base_layer.padding_idx,
                              max_norm=base_layer.max_norm, norm_type=base_layer.norm_type,
                              scale_grad_by_freq=base_layer.scale_grad_by_freq,
                              sparse=base_layer.sparse)  # (..., r)
        return base_out + (after_a @ self.lora_B.T).to(base_out.dtype) * self.scale

    def delta_weight(self, base_layer: nn.Module) -> Tensor:
        return merge_math.embedding_delta(self.lora_A, self.lora_B, self.scale)

    def file_tensors(self) -> dict[str, Tensor]:
        # PEFT stores embedding LoRA as bare parameters: no ".weight" suffix.
        return {"lora_embedding_A": self.lora_A, "lora_embedding_B": self.lora_B}


class LoraConv(_LoraBase):
    """LoRA for nn.Conv1d / nn.Conv2d: A is a conv with the base's kernel, B a 1x1 conv.

    lora_A: (r, c_in, *k), lora_B: (c_out, r, 1, ...). Grouped convolutions are not supported.
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, init: str = "kaiming") -> None:
        super().__init__(r, alpha, dropout, use_rslora)
        if base.groups != 1:
            raise ValueError(f"{type(base).__name__} with groups={base.groups}: LoRA supports groups=1 only")
        k = tuple(base.kernel_size)
        self.conv = F.conv1d if len(k) == 1 else F.conv2d
        self.lora_A = nn.Parameter(torch.empty(r, base.in_channels, *k))
        self.lora_B = nn.Parameter(torch.zeros(base.out_channels, r, *(1,) * len(k)))
        init_lora_A(self.lora_A.data, init, r)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor, base_out: Tensor, base_layer: nn.Module) -> Tensor:
        x = self.drop(x.to(self.lora_A.dtype))
        h = self.conv(x, self.lora_A, None, base_layer.stride, base_layer.padding, base_layer.dilation)
        return base_out + self.conv(h, self.lora_B).to(base_out.dtype) * self.scale

    def delta_weight(self, base_layer: nn.Module) -> Tensor:
        return merge_math.conv_delta(self.lora_A, self.lora_B, self.scale)
