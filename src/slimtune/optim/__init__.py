"""Memory-lean optimizers: 8-bit AdamW and CPU offloading of optimizer state, with safetensors checkpoints."""

from slimtune.optim.adamw8bit import AdamW8bit
from slimtune.optim.checkpoint import load_optimizer, save_optimizer
from slimtune.optim.offload import OffloadedOptimizer

__all__ = ["AdamW8bit", "OffloadedOptimizer", "load_optimizer", "save_optimizer"]
