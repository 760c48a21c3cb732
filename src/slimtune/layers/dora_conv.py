"""DoRA (Liu et al. 2024) on nn.Conv1d / nn.Conv2d: LoRA's conv pair plus a trainable per-channel magnitude.

    out = m / ||W0 + s dW||  *  (conv(x, W0) + s conv(conv(x, A), B))  + bias      (norm detached, Sec. 4.3)

with ||.|| over every dim of the kernel but the output channel, as Hugging Face PEFT's ``DoraConv2dLayer``
(peft/tuners/lora/dora.py). B is a 1x1 conv, so the kernel update dW = conv(A, B) is the matrix product
B (c_out, r) @ A (r, c_in * prod(k)) laid back out as (c_out, c_in, *k): the linear DoRA maths of
``slimtune.merging`` (``dora_norm``, ``dora_merged``, ``dora_unmerged``) applies unchanged to the kernels
flattened to (c_out, c_in * prod(k)). Plain autograd: convs are not where DoRA's saved activations matter
(a UNet's conv targets are a few layers), and the expression is PEFT's own, so gradients match by
construction. Torch only, no I/O.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimtune import merging as merge_math
from slimtune.layers.amp import no_autocast
from slimtune.layers.lora import LoraConv

MAGNITUDE_KEY = "lora_magnitude_vector"  # PEFT's file key; PEFT stores it as (1, c_out, 1[, 1])


def flat_factors(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """(A (r, c_in * prod(k)), B (c_out, r)): a conv LoRA's factors as the matrices whose product is the
    flattened kernel update (B must be 1x1: (c_out, r, 1[, 1]))."""
    return A.flatten(1), B.flatten(1)


class DoraConv(LoraConv):
    """DoRA for nn.Conv1d / nn.Conv2d (groups=1): LoraConv's A (r, c_in, *k) and B (c_out, r, 1..) plus the
    magnitude m (c_out,), starting at ||W0 + s dW|| per output channel so step 0 equals the base.

    Merging replaces W0 by m / ||V|| * V (V = W0 + s dW, per output channel) and keeps the norm to undo it.
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, init: str = "kaiming") -> None:
        super().__init__(base, r, alpha, dropout, use_rslora, init)
        self.magnitude = nn.Parameter(self.norm(base))
        self._merged_norm: Tensor | None = None  # norm of V when merged, to unmerge exactly

    def init_magnitude(self, base: nn.Module) -> None:
        """Reset m to ||W0 + s dW|| (after an init or a dtype change), so step 0 equals the base."""
        with torch.no_grad():
            self.magnitude.copy_(self.norm(base))

    def norm(self, base: nn.Module) -> Tensor:
        """||W0 + s dW|| per output channel: (c_out,) fp32, detached (a constant of the step)."""
        with torch.no_grad(), no_autocast(self.lora_A.device.type):
            A, B = flat_factors(self.lora_A, self.lora_B)
            return merge_math.dora_norm(base.weight.flatten(1), A, B, self.scale)

    def adapter_params(self) -> Iterator[nn.Parameter]:
        return iter((self.lora_A, self.lora_B, self.magnitude))

    def file_tensors(self) -> dict[str, Tensor]:
        """PEFT's keys and layouts: the magnitude as (1, c_out, 1[, 1]), a view of the (c_out,) parameter."""
        shape = (1, -1) + (1,) * (self.lora_A.dim() - 2)
        return {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B,
                MAGNITUDE_KEY: self.magnitude.view(shape)}

    def load_file_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Copy A, B and m (m as PEFT's (1, c_out, 1..) or as (c_out,)). Raises ValueError naming the key for
        a shape this layer cannot take; every shape is checked before anything is copied."""
        targets = self.file_tensors()  # views of the parameters, in the file's layout
        m = tensors[MAGNITUDE_KEY]
        if m.dim() == 1 and m.numel() == self.magnitude.numel():
            m = m.view(targets[MAGNITUDE_KEY].shape)
        given = {**tensors, MAGNITUDE_KEY: m}
        for key, target in targets.items():
            if given[key].shape != target.shape:
                raise ValueError(f"{key}: file has shape {tuple(tensors[key].shape)}, this layer needs "
                                 f"{tuple(target.shape)} (different rank or base model?)")
        with torch.no_grad():
            for key, target in targets.items():
                target.copy_(given[key])

    def forward(self, x: Tensor, base_out: Tensor, base_layer: nn.Module) -> Tensor:
        """x: (N, c_in, *spatial); base_out: (N, c_out, *spatial') -> same shape and dtype as base_out.

        PEFT's expression: base_out + (c - 1) * conv(x', W0) + c * s * lora(x'), c = m / ||V|| per channel;
        without dropout (or in eval) conv(x, W0) is base_out less the bias, which is left unscaled.
        """
        view = (1, -1) + (1,) * (base_out.dim() - 2)
        c = (self.magnitude / self.norm(base_layer)).view(view)  # (1, c_out, 1..), fp32 with an fp32 m
        x = x.to(self.lora_A.dtype)
        if self.training and self.dropout > 0:
            x = self.drop(x)
            weight = base_layer.weight
            plain = self.conv(x, weight if torch.is_autocast_enabled(x.device.type) else weight.to(x.dtype), None,
                              base_layer.stride, base_layer.padding, base_layer.dilation)  # W0 x', no bias
        else:
            bias = base_layer.bias
            plain = base_out if bias is None else base_out - bias.view(view)
        h = self.conv(x, self.lora_A, None, base_layer.stride, base_layer.padding, base_layer.dilation)
        lora = self.conv(h, self.lora_B)  # (N, c_out, *spatial')
        out = base_out + (c - 1) * plain + (c * self.scale) * lora
        return out.to(base_out.dtype)

    # -- merging -------------------------------------------------------------------------------
    def delta_weight(self, base_layer: nn.Module) -> Tensor:
        """W' - W0 (c_out, c_in, *k), fp32; valid while this adapter is not merged."""
        W0 = base_layer.weight
        A, B = flat_factors(self.lora_A, self.lora_B)
        merged, _ = merge_math.dora_merged(W0.float().flatten(1), A, B, self.scale, self.magnitude)
        return (merged - W0.float().flatten(1)).view(W0.shape)

    def merged_weight(self, weight: Tensor, base_layer: nn.Module) -> Tensor:
        A, B = flat_factors(self.lora_A, self.lora_B)
        new, self._merged_norm = merge_math.dora_merged(weight.flatten(1), A, B, self.scale, self.magnitude)
        return new.view(weight.shape)

    def unmerged_weight(self, weight: Tensor, base_layer: nn.Module) -> Tensor:
        if self._merged_norm is None:
            raise RuntimeError("DoRA adapter is not merged; nothing to unmerge")
        A, B = flat_factors(self.lora_A, self.lora_B)
        old = merge_math.dora_unmerged(weight.flatten(1), A, B, self.scale, self.magnitude, self._merged_norm)
        self._merged_norm = None
        return old.view(weight.shape)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora=True"
