"""Bottleneck adapters in the mixed batch: per slot, h' = h + s * up(act(down(h))) on a layer's output h.

A bottleneck adapter (Houlsby et al.) is not a weight update, but it is still a per-row function of the row's own
layer output, so rows of different adapters share the batch the way LoRA rows do: gather the rows by slot (the
``RowPlan``), two batched matmuls with each group's own down / up (and biases), the group's nonlinearity in
between. Sizes are zero-padded to the largest loaded (act(0) = 0 for every supported nonlinearity and the padded
columns of up are zero, so padding adds exact zeros), and a slot holding no bottleneck here is all zeros: its
rows get exactly h. Torch only.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from slimtune.layers.bottleneck import ACTIVATIONS
from slimtune.serve.layer import RowPlan


class BottleneckSlots(nn.Module):
    """Every loaded bottleneck adapter of one wrapped layer, by slot.

    Buffers (float32): down (S, m, d), down_bias (S, m), up (S, d, m), up_bias (S, d), scale (S,); ``acts[k]`` is
    slot k's nonlinearity name. d is the wrapped layer's output width, m the largest bottleneck size loaded.
    """

    def __init__(self, d: int, device: torch.device) -> None:
        super().__init__()
        for name, shape in (("down", (0, 0, d)), ("down_bias", (0, 0)), ("up", (0, d, 0)), ("up_bias", (0, d)),
                            ("scale", (0,))):
            self.register_buffer(name, torch.zeros(shape, device=device), persistent=False)
        self.acts: list[str] = []

    def set_slot(self, slot: int, down: Tensor, down_bias: Tensor, up: Tensor, up_bias: Tensor, scale: float,
                 nonlinearity: str) -> None:
        """Put one adapter's down (m, d) + bias (m,), up (d, m) + bias (d,) in ``slot``."""
        m = down.shape[0]
        self.grow(max(self.slots, slot + 1), max(self.down.shape[1], m))
        with torch.no_grad():
            self.clear_slot(slot)
            self.down[slot, :m], self.down_bias[slot, :m] = down.to(self.down), down_bias.to(self.down)
            self.up[slot, :, :m], self.up_bias[slot] = up.to(self.up), up_bias.to(self.up)
            self.scale[slot] = scale
        self.acts[slot] = nonlinearity

    def clear_slot(self, slot: int) -> None:
        """Zero ``slot``: its rows get the layer's output unchanged."""
        if slot < self.slots:
            with torch.no_grad():
                for t in (self.down, self.down_bias, self.up, self.up_bias, self.scale):
                    t[slot].zero_()

    @property
    def slots(self) -> int:
        return self.down.shape[0]

    def grow(self, S: int, m: int) -> None:
        """Zero-padded buffers of S slots and size m holding the old ones."""
        old_s, old_m = self.down.shape[:2]
        if (S, m) == (old_s, old_m):
            return
        down, up = self.down.new_zeros(S, m, self.down.shape[2]), self.up.new_zeros(S, self.up.shape[1], m)
        down_bias, up_bias, scale = self.down.new_zeros(S, m), self.up.new_zeros(S, self.up.shape[1]), \
            self.scale.new_zeros(S)
        down[:old_s, :old_m], up[:old_s, :, :old_m] = self.down, self.up
        down_bias[:old_s, :old_m], up_bias[:old_s], scale[:old_s] = self.down_bias, self.up_bias, self.scale
        self.down, self.up, self.down_bias, self.up_bias, self.scale = down, up, down_bias, up_bias, scale
        self.acts += ["relu"] * (S - len(self.acts))

    def delta(self, h: Tensor, plan: RowPlan) -> Tensor:
        """s_k * up_k(act_k(down_k(h_n))) for the rows ``plan.used`` (all, in order, when None); h: (N, T, d).
        Returns (n, T, d) float32."""
        if plan.top_slot >= self.slots:
            self.grow(plan.top_slot + 1, self.down.shape[1])
        G, M, T = len(plan.slot_ids), plan.group, h.shape[1]
        hg = h.to(self.down.dtype).index_select(0, plan.gather).reshape(G, M * T, h.shape[2])
        z = torch.baddbmm(self.down_bias.index_select(0, plan.slots)[:, None, :], hg,
                          self.down.index_select(0, plan.slots).transpose(1, 2))  # (G, M*T, m)
        names = [self.acts[k] for k in plan.slot_ids]
        if len(set(names)) == 1:
            z = ACTIVATIONS[names[0]](z)
        else:
            z = torch.stack([ACTIVATIONS[a](z[g]) for g, a in enumerate(names)])
        u = torch.baddbmm(self.up_bias.index_select(0, plan.slots)[:, None, :], z,
                          self.up.index_select(0, plan.slots).transpose(1, 2))  # (G, M*T, d)
        u = u * self.scale.index_select(0, plan.slots)[:, None, None]
        return u.reshape(G * M, T, -1).index_select(0, plan.scatter)
