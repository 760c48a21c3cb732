"""Tiny random models for unit tests (built from configs: no download), and shared helpers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert_cls(num_labels: int = 3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=64, num_labels=num_labels)
    return BertForSequenceClassification(cfg).eval()


class ConvToy(nn.Module):
    """A small conv net with 3x3, 1x1 and 1-d convolutions and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.seq = nn.Conv1d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):  # x: (B, 3, H, W)
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))  # (B, 8, H, W)
        h = self.seq(h.flatten(2))  # (B, 8, H*W)
        return self.head(h.mean(-1))  # (B, 4)


def conv_toy():
    return ConvToy().eval()


def randomize_adapters(model: nn.Module, std: float = 0.1, seed: int = 1) -> None:
    """Give every trainable tensor random values, so B != 0 and adapters change outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def tokens(batch: int = 2, seq: int = 12, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def fresh():
    """deepcopy helper: fresh(model) returns an independent copy."""
    return copy.deepcopy
