"""Many LoRA adapters in one Linear-like layer, each batch row using its own (or none): grouped batched matmuls.

The idea of Punica's SGMV and S-LoRA: instead of merging one adapter into the base weight, keep every adapter's
A and B stacked by *slot*; group the batch rows by slot once per forward (``RowPlan``: rows sorted by slot and
padded to the largest group), and per layer run two batched matmuls over the G adapters present, each group's rows
against its own A and B. A per-row gather of A and B (BGMV) would copy R x (d_in + d_out) numbers per row per
layer; grouping copies only the rows' activations, and the planning (sorting, padding, index tensors) happens once
per forward, not once per layer. The base matmul is shared by all rows. Adapters of different ranks are
zero-padded to the largest rank loaded, and an adapter that does not target a layer has an all-zero slot there:
both add exact zeros (a padded sum may round differently in the last bit, 1e-7 relative), so one batch can mix
adapters of any ranks and target sets. DoRA adapters share the batch too: at inference DoRA's per-output-row
rescaling c = m / ||W0 + s B A|| is a constant of the adapter, kept per slot (1 for LoRA slots), and their rows get
(c - 1) * (W0 x) + c * delta, PEFT's DoRA expression (exactly delta for a LoRA slot). Torch only: no files, no HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

NO_ADAPTER = -1  # a row's slot index meaning "the base model only"


@dataclass(frozen=True)
class RowPlan:
    """The rows of one batch grouped by adapter slot; built once per forward, read by every layer.

    slots: (G,) long, the distinct slots used, ascending. gather: (G * M,) long, the batch row that each position
    of the padded (G, M) layout reads (group g's rows, then its first row repeated up to M: padding positions are
    computed and never read back). scatter: (n,) long, the padded position of each row in ``used``. used: (n,)
    long rows that use an adapter, or None when all N rows do (then ``scatter`` follows rows 0..N-1).
    row_slots: (n,) long, the slot of each row in ``used`` (for per-slot vectors such as DoRA's scale).
    """

    slots: Tensor
    gather: Tensor
    scatter: Tensor
    used: Tensor | None
    row_slots: Tensor
    slot_ids: tuple[int, ...]  # ``slots`` as Python ints
    group: int  # M: rows per group after padding
    top_slot: int  # the largest slot used

    @classmethod
    def of(cls, rows: Sequence[int], device: torch.device | str = "cpu") -> "RowPlan | None":
        """The plan for per-row slots ``rows`` (NO_ADAPTER: the base); None when no row uses an adapter."""
        used = [n for n, k in enumerate(rows) if k != NO_ADAPTER]
        if not used:
            return None
        groups: dict[int, list[int]] = {}
        for n in used:
            groups.setdefault(rows[n], []).append(n)
        slots = sorted(groups)
        m = max(len(g) for g in groups.values())
        gather, where = [], {}
        for g, k in enumerate(slots):
            members = groups[k]
            where.update({n: g * m + j for j, n in enumerate(members)})
            gather += members + [members[0]] * (m - len(members))

        def long(values: list[int]) -> Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        return cls(long(slots), long(gather), long([where[n] for n in used]),
                   None if len(used) == len(rows) else long(used), long([rows[n] for n in used]), tuple(slots), m,
                   slots[-1])


def grouped_lora_delta(x: Tensor, A: Tensor, B: Tensor, scale: Tensor, plan: RowPlan) -> Tensor:
    """The LoRA update of each used row n: s_k (x_n A_k^T) B_k^T with k its slot, grouped by slot.

    x: (N, T, d_in); A: (S, R, d_in); B: (S, d_out, R); scale: (S,); every slot of ``plan`` < S.
    Returns (n, T, d_out) in A's dtype for the rows ``plan.used`` (all N rows, in order, when it is None).
    """
    G, M, T = plan.slots.shape[0], plan.group, x.shape[1]
    xg = x.to(A.dtype).index_select(0, plan.gather).reshape(G, M * T, x.shape[2])  # rows sorted by slot, padded
    a = A.index_select(0, plan.slots)  # (G, R, d_in): one copy per adapter present, not per row
    b = B.index_select(0, plan.slots)  # (G, d_out, R)
    xa = torch.bmm(xg, a.transpose(1, 2)) * scale.index_select(0, plan.slots)[:, None, None]  # (G, M*T, R)
    delta = torch.bmm(xa, b.transpose(1, 2))  # (G, M*T, d_out)
    return delta.reshape(G * M, T, -1).index_select(0, plan.scatter)


def linear_dims(base: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a Linear-like layer: nn.Linear, a 4-bit linear, or GPT-2's Conv1D (weight (d_in, d_out))."""
    if isinstance(base, Conv1D):
        d_in, d_out = base.weight.shape
        return int(d_in), int(d_out)
    return int(base.in_features), int(base.out_features)


class RowAdapters:
    """The plan of the batch being computed, shared by every MultiLoraLinear of one model.

    ``plan`` is None (every row uses the base) or the ``RowPlan`` of the rows; set by the model around each forward.
    """

    def __init__(self) -> None:
        self.plan: RowPlan | None = None


class MultiLoraLinear(nn.Module):
    """Wraps a Linear-like ``base_layer``; y = base(x) + s_k (x A_k^T) B_k^T with k the row's slot.

    Buffers: A (S, R, d_in), B (S, d_out, R), scale (S,) in float32 (or ``dtype``); once a DoRA adapter is set,
    also C (S, d_out), DoRA's per-row rescaling (ones for LoRA slots). Slots are set and cleared by the owning
    model (``set_slot`` / ``clear_slot``), which never changes them while a forward runs.
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
        self.register_buffer("C", None, persistent=False)  # (S, d_out) DoRA column scales; None until one is set
        self.bottleneck: nn.Module | None = None  # serve.bottleneck.BottleneckSlots once one is set

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        out = self.base_layer(x, *args, **kwargs)
        plan = self.state.plan
        if plan is None or (self.A.shape[1] == 0 and self.bottleneck is None):
            return out
        out3 = out.reshape(out.shape[0], -1, out.shape[-1])  # (N, T, d_out), a fresh tensor of base_layer
        delta = None
        if self.A.shape[1] > 0:
            if plan.top_slot >= self.A.shape[0]:  # slots this layer never held: zero slots (the base), grown once
                self._grow(plan.top_slot + 1, self.A.shape[1])
            x3 = x.reshape(x.shape[0], -1, x.shape[-1])  # (N, T, d_in)
            delta = grouped_lora_delta(x3, self.A, self.B, self.scale, plan)  # (n, T, d_out)
            if self.C is not None:
                delta = self._dora(delta, out3 if plan.used is None else out3.index_select(0, plan.used), plan)
        if self.bottleneck is not None:  # on the base output h, before any LoRA term (a row has one adapter)
            more = self.bottleneck.delta(out3, plan)
            delta = more if delta is None else delta + more
        delta = delta.to(out.dtype)
        if plan.used is None:
            return out + delta.reshape(out.shape)
        out3.index_add_(0, plan.used, delta)
        return out3.reshape(out.shape)

    def set_bottleneck(self, slot: int, down: Tensor, down_bias: Tensor, up: Tensor, up_bias: Tensor, scale: float,
                       nonlinearity: str) -> None:
        """Put a bottleneck adapter (on this layer's output) in ``slot``; see serve.bottleneck."""
        from slimtune.serve.bottleneck import BottleneckSlots

        if self.bottleneck is None:
            self.bottleneck = BottleneckSlots(self.B.shape[1], self.B.device)
        self.bottleneck.set_slot(slot, down, down_bias, up, up_bias, scale, nonlinearity)

    def _dora(self, delta: Tensor, base_rows: Tensor, plan: RowPlan) -> Tensor:
        """(c - 1) * (W0 x) + c * delta for the used rows; base_rows (n, T, d_out) = base(x) with its bias."""
        c = self.C.index_select(0, plan.row_slots)[:, None, :]  # (n, 1, d_out)
        w0x = base_rows.to(c.dtype)
        bias = getattr(self.base_layer, "bias", None)
        if bias is not None:  # DoRA rescales W0 x only; the bias is added once, unscaled
            w0x = w0x - bias.to(c.dtype)
        return (c - 1) * w0x + c * delta

    def set_slot(self, slot: int, A: Tensor, B: Tensor, scale: float, column_scale: Tensor | None = None) -> None:
        """Put one adapter's A (r, d_in), B (d_out, r) and scale in ``slot``, growing slots and rank as needed;
        ``column_scale`` (d_out,): DoRA's m / ||W0 + s B A|| (None for LoRA: ones)."""
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
            if column_scale is not None and self.C is None:
                self.C = self.B.new_ones(self.A.shape[0], self.B.shape[1])
            if self.C is not None:
                self.C[slot] = 1.0 if column_scale is None else column_scale.to(self.C)

    def clear_slot(self, slot: int) -> None:
        """Zero ``slot`` (its adapter was unloaded): rows pointing at it get the base output."""
        if self.bottleneck is not None:
            self.bottleneck.clear_slot(slot)
        if slot < self.A.shape[0]:
            with torch.no_grad():
                self.A[slot].zero_()
                self.B[slot].zero_()
                self.scale[slot] = 0.0
                if self.C is not None:
                    self.C[slot] = 1.0

    def _grow(self, S: int, R: int) -> None:
        """New zero buffers of S slots and rank R holding the old ones (the padding adds zeros)."""
        old_s, old_r = self.A.shape[:2]
        A = self.A.new_zeros(S, R, self.A.shape[2])
        B = self.B.new_zeros(S, self.B.shape[1], R)
        scale = self.scale.new_zeros(S)
        A[:old_s, :old_r], B[:old_s, :, :old_r], scale[:old_s] = self.A, self.B, self.scale
        self.A, self.B, self.scale = A, B, scale
        if self.C is not None:
            C = self.C.new_ones(S, self.C.shape[1])
            C[:old_s] = self.C
            self.C = C

    def extra_repr(self) -> str:
        return f"slots={self.A.shape[0]}, max_rank={self.A.shape[1]}"
