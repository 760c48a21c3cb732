"""Layer kinds are told apart by type (transformers' Conv1D class), never by a class-name string."""

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from slimtune.injection import is_linear_like
from slimtune.layers.dora import dense_weight


class GPT2StyleConv1D(Conv1D):
    """A subclass, as a model's own code might define: still GPT-2's transposed linear."""


class Conv1DLookalike(nn.Module):
    """Named Conv1D, with an ``nf`` attribute, but not transformers' layer (nor linear-like)."""

    def __init__(self) -> None:
        super().__init__()
        self.nf = 4
        self.weight = nn.Parameter(torch.zeros(3, 4))


Conv1DLookalike.__name__ = "Conv1D"


def test_conv1d_subclass_is_linear_like_and_its_dense_weight_is_the_transpose():
    torch.manual_seed(0)
    layer = GPT2StyleConv1D(nf=5, nx=3)  # weight stored (d_in=3, d_out=5)
    nn.init.normal_(layer.weight)
    x = torch.randn(2, 3)
    assert is_linear_like(layer)
    w = dense_weight(layer)  # (d_out, d_in), as nn.Linear stores it
    assert w.shape == (5, 3)
    torch.testing.assert_close(x @ w.T + layer.bias, layer(x))  # the oracle: the layer's own forward


def test_a_class_merely_named_conv1d_is_not_linear_like():
    assert type(Conv1DLookalike()).__name__ == "Conv1D"
    assert not is_linear_like(Conv1DLookalike())
