"""Adapter layers: torch modules only, no file or CLI knowledge."""

from slimtune.layers.base import Adapter, AdaptedLayer, TrainedCopy
from slimtune.layers.dora_conv import DoraConv
from slimtune.layers.lora import LoraConv, LoraEmbedding, LoraLinear

__all__ = ["Adapter", "AdaptedLayer", "TrainedCopy", "DoraConv", "LoraConv", "LoraEmbedding", "LoraLinear"]
