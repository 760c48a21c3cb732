"""Many LoRA adapters in one Linear-like layer, each batch row using its own (or none): batched gather-matmuls.

The idea of Punica's BGMV and S-LoRA: instead of merging one adapter into the base weight, keep every adapter's
A and B stacked by *slot* and, per row of the batch, gather that row's A and B and run two batched matmuls. The
base matmul is shared by all rows. Adapters of different ranks are zero-padded to the largest rank loaded, and an
adapter that does not target a layer has an all-zero slot there: both add exact zeros (a padded sum may round
differently in the last bit, 1e-7 relative), so one batch can mix adapters of any ranks and target sets. Torch only: no files, no HTTP.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

NO_ADAPTER = -1  # a row's slot index meaning "the base model only"


def batched_lora_delta(x: Tensor, A: Tensor, B: Tensor, scale: Tensor, rows: Tensor) -> Tensor:
    """The LoRA update for each row: s_k (x_n A_k^T) B_k^T with k = rows[n].

    x: (N, T, d_in); A: (S, R, d_in); B: (S, d_out, R); scale: (S,); rows: (N,) long in [0, S).
    Returns (N, T, d_out) in A's dtype. Zero-padded ranks and zero slots add zeros.
    """
    a = A.index_select(0, rows)  # (N, R, d_in): the BGMV gather
    b = B.index_select(0, rows)  # (N, d_out, R)
    xa = torch.bmm(x.to(A.dtype), a.transpose(1, 2))  # (N, T, R)
    xa = xa * scale.index_select(0, rows)[:, None, None]
    return torch.bmm(xa, b.transpose(1, 2))  # (N, T, d_out)


def linear_dims(base: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a Linear-like layer: nn.Linear, a 4-bit linear, or GPT-2's Conv1D (weight (d_in, d_out))."""
    if isinstance(base, Conv1D):
        d_in, d_out = base.weight.shape
        return int(d_in), int(d_out)
    return int(base.in_features), int(base.out_features)


class RowAdapters:
    """The per-row slot indices of the batch being computed, shared by every MultiLoraLinear of one model.

    ``rows`` is None (every row uses the base) or (N,) long; set by the model around each forward.
    """

    def __init__(self) -> None:
        self.rows: Tensor | None = None


class MultiLoraLinear(nn.Module):
    """Wraps a Linear-like ``base_layer``; y = base(x) + s_k (x A_k^T) B_k^T with k the row's slot.

    Buffers: A (S, R, d_in), B (S, d_out, R), scale (S,) in float32 (or ``dtype``). Slots are set and cleared by
    the owning model (``set_slot`` / ``clear_slot``), which never changes them while a forward runs.
    """

    def __init__(self, base_layer: nn.Module, state: RowAdapters, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.state = state
        d_in, d_out = linear_dims(base_layer)
        device = next(base_layer.parameters()).device
        self.register_buffer("A", torch.zeros(0, 0, d_in, dtype=dtype, device=device), persistent=False)
        self.register_buffer("B", torch.zeros(0, d_out, 0, dtype=dtype, device=device), persistent=False)
        self.register_buffer("scale", torch.zeros(0, dtype=dtype, device=device), persistent=False)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        out = self.base_layer(x, *args, **kwargs)
        rows = self.state.rows
        if rows is None or self.A.shape[0] == 0:
            return out
        rows = torch.where(rows < self.A.shape[0], rows, NO_ADAPTER)  # slots beyond this layer's: not targeted
        used = rows >= 0
        if not bool(used.any()):
            return out
        x3 = x.reshape(x.shape[0], -1, x.shape[-1])  # (N, T, d_in)
        if bool(used.all()):
            delta = batched_lora_delta(x3, self.A, self.B, self.scale, rows)
            return out + delta.reshape(out.shape).to(out.dtype)
        idx = used.nonzero().squeeze(1)  # (n,) rows that use an adapter
        delta = batched_lora_delta(x3.index_select(0, idx), self.A, self.B, self.scale, rows.index_select(0, idx))
        out3 = out.reshape(out.shape[0], -1, out.shape[-1]).clone()
        out3.index_add_(0, idx, delta.to(out.dtype))
        return out3.reshape(out.shape)

    def set_slot(self, slot: int, A: Tensor, B: Tensor, scale: float) -> None:
        """Put one adapter's A (r, d_in), B (d_out, r) and scale in ``slot``, growing slots and rank as needed."""
        r = A.shape[0]
        S, R = max(self.A.shape[0], slot + 1), max(self.A.shape[1], r)
        if (S, R) != tuple(self.A.shape[:2]):
            self._grow(S, R)
        with torch.no_grad():
            self.A[slot].zero_()
            self.B[slot].zero_()
            self.A[slot, :r] = A.to(self.A)
            self.B[slot, :, :r] = B.to(self.B)
            self.scale[slot] = scale

    def clear_slot(self, slot: int) -> None:
        """Zero ``slot`` (its adapter was unloaded): rows pointing at it get the base output."""
        if slot < self.A.shape[0]:
            with torch.no_grad():
                self.A[slot].zero_()
                self.B[slot].zero_()
                self.scale[slot] = 0.0

    def _grow(self, S: int, R: int) -> None:
        """New zero buffers of S slots and rank R holding the old ones (the padding adds zeros)."""
        old_s, old_r = self.A.shape[:2]
        A = self.A.new_zeros(S, R, self.A.shape[2])
        B = self.B.new_zeros(S, self.B.shape[1], R)
        scale = self.scale.new_zeros(S)
        A[:old_s, :old_r], B[:old_s, :, :old_r], scale[:old_s] = self.A, self.B, self.scale
        self.A, self.B, self.scale = A, B, scale

    def extra_repr(self) -> str:
        return f"slots={self.A.shape[0]}, max_rank={self.A.shape[1]}"
