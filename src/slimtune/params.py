"""Trainable vs total parameters, counted one way for every method, and the line reports print."""

from __future__ import annotations

from torch import nn


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, each tensor once; a packed quantized weight (a layer with a
    ``dequantize`` method and an integer weight) counts as the weights it holds, not its bytes."""
    params = {id(p): p for p in model.parameters()}
    sizes = {k: p.numel() for k, p in params.items()}
    for m in model.modules():
        w = getattr(m, "weight", None)
        if callable(getattr(m, "dequantize", None)) and id(w) in sizes and not w.is_floating_point():
            sizes[id(w)] = m.in_features * m.out_features
    return sum(sizes[k] for k, p in params.items() if p.requires_grad), sum(sizes.values())


class ParamCounts:
    """For a report with ``trainable_params`` and ``total_params``: the percentage and the summary line."""

    trainable_params: int
    total_params: int

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / max(self.total_params, 1)

    def counts_line(self) -> str:
        return (f"trainable params: {self.trainable_params:,} / {self.total_params:,} "
                f"({self.trainable_percent:.4f}%)")
