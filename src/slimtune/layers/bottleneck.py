"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP"). Torch only.

An adapter sits on the output h of a block's output projection (attention and/or MLP):

    h' = h + s * up(act(down(dropout(h))))        down: d -> m, up: m -> d, m << d

``up`` starts at zero, so h' = h at step 0. The nonlinearity makes the update depend on h itself,
not a fixed weight change, so a bottleneck adapter cannot be folded into W0: it stays in the forward
pass at inference and costs extra latency (two small matmuls and an activation per wrapped layer).
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimtune.names import suffix_match

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}

NOT_MERGEABLE = ("a bottleneck adapter applies a nonlinearity to the layer's output, so it is not a weight "
                 "update and stays in the forward pass (see benchmarks/methods_bottleneck_latency.py); "
                 "use LoRA/DoRA (method: lora) for zero added inference latency")


class BottleneckAdapter(nn.Module):
    """down (m, d) + bias, up (d, m) + bias; d is the wrapped layer's output width, m the bottleneck size."""

    mergeable = False
    not_mergeable_reason = NOT_MERGEABLE

    def __init__(self, d: int, size: int, nonlinearity: str = "relu", dropout: float = 0.0,
                 scale: float = 1.0) -> None:
        super().__init__()
        if nonlinearity not in ACTIVATIONS:
            raise ValueError(f"nonlinearity={nonlinearity!r}: must be one of {', '.join(ACTIVATIONS)}")
        self.d, self.size, self.nonlinearity, self.scale = d, size, nonlinearity, scale
        self.down = nn.Linear(d, size)  # nn.Linear's kaiming-uniform init
        self.up = nn.Linear(size, d)
        nn.init.zeros_(self.up.weight)  # zero up-projection: the adapted model equals the base at step 0
        nn.init.zeros_(self.up.bias)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def adapter_params(self) -> Iterator[nn.Parameter]:
        return iter((self.down.weight, self.down.bias, self.up.weight, self.up.bias))

    def forward(self, x: Tensor, base_out: Tensor, base_layer: nn.Module) -> Tensor:
        h = self.drop(base_out.to(self.down.weight.dtype))  # (..., d)
        z = ACTIVATIONS[self.nonlinearity](self.down(h))  # (..., m)
        return base_out + (self.up(z) * self.scale).to(base_out.dtype)  # (..., d)

    def delta_weight(self, base_layer: nn.Module) -> Tensor:
        raise TypeError(f"BottleneckAdapter cannot be merged: {NOT_MERGEABLE}")

    def merged_weight(self, weight: Tensor, base_layer: nn.Module) -> Tensor:
        raise TypeError(f"BottleneckAdapter cannot be merged: {NOT_MERGEABLE}")

    def unmerged_weight(self, weight: Tensor, base_layer: nn.Module) -> Tensor:
        raise TypeError(f"BottleneckAdapter cannot be merged: {NOT_MERGEABLE}")

    def file_tensors(self) -> dict[str, Tensor]:
        return {"adapter_down.weight": self.down.weight, "adapter_down.bias": self.down.bias,
                "adapter_up.weight": self.up.weight, "adapter_up.bias": self.up.bias}

    def load_file_tensors(self, tensors: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for key, param in self.file_tensors().items():
                if tensors[key].shape != param.shape:
                    raise ValueError(f"{key}: file has shape {tuple(tensors[key].shape)}, this layer needs "
                                     f"{tuple(param.shape)}")
                param.copy_(tensors[key])

    def extra_repr(self) -> str:
        return f"d={self.d}, size={self.size}, nonlinearity={self.nonlinearity}, scale={self.scale:g}"


# Output projections by position, as dotted-name suffixes across common architectures.
_ATTENTION_OUT = ("self_attn.o_proj", "attn.c_proj", "attention.output.dense", "self_attn.out_proj",
                  "attn.out_proj", "attention.dense", "attn.o_proj")
_MLP_OUT = ("mlp.down_proj", "mlp.c_proj", "fc2", "mlp.dense_4h_to_h", "mlp.fc_out", "ffn.lin2", "mlp.fc2")


def position_of(name: str) -> str | None:
    """``attention`` / ``mlp`` when ``name`` is that block's output projection, else None.

    BERT-style encoders name the MLP output ``layer.N.output.dense`` and the attention output
    ``layer.N.attention.output.dense``; both end in ``output.dense``.
    """
    if suffix_match(name, _ATTENTION_OUT):
        return "attention"
    if suffix_match(name, _MLP_OUT) or (name.endswith(".output.dense") and not name.endswith("attention.output.dense")):
        return "mlp"
    return None
