"""LoRA+ (Hayou et al. 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models"): B learns faster than A.

With B = 0 at the start, B's gradients are small and a single learning rate under-trains it; LoRA+
gives B the rate lr * ratio (the paper suggests 2^4 = 16). The groups are the same as Hugging Face
PEFT's ``create_loraplus_optimizer`` (tested against it):

    A        LoRA A matrices and any other 2-d trainable tensor       lr            weight_decay
    embedding  both matrices of an embedding LoRA                     lr_embedding  weight_decay
    B        LoRA B matrices and 1-d tensors (DoRA magnitudes...)     lr * ratio    weight_decay
    B_no_decay  the B-rate tensors that are biases or norm weights     lr * ratio    0

Roles come from the adapter objects (their ``lora_A`` / ``lora_B`` attributes), never from names.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn

from slimtune.layers.base import AdaptedLayer
from slimtune.layers.lora import LoraEmbedding

_NORM_TYPES = (nn.LayerNorm,)  # as transformers' ALL_LAYERNORM_LAYERS, whose weights are never decayed


def _no_decay(model: nn.Module) -> set[int]:
    """ids of parameters exempt from weight decay: biases and norm-layer weights (by type, and any
    module whose class name ends in ``Norm`` such as LlamaRMSNorm is *not* exempt, as in PEFT)."""
    out = set()
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            if isinstance(module, _NORM_TYPES) or "bias" in pname:
                out.add(id(p))
    return out


def _roles(model: nn.Module) -> dict[int, str]:
    """id(param) -> 'A' / 'B' / 'embedding' for every parameter owned by an adapter object."""
    roles: dict[int, str] = {}
    for module in model.modules():
        if not isinstance(module, AdaptedLayer):
            continue
        for adapter in module.adapters.values():
            for p in adapter.adapter_params():
                if isinstance(adapter, LoraEmbedding):
                    roles[id(p)] = "embedding"
                elif p is getattr(adapter, "lora_B", None) or p.ndim == 1:
                    roles[id(p)] = "B"
                else:
                    roles[id(p)] = "A"
    return roles


def loraplus_param_groups(model: nn.Module, lr: float, ratio: float = 16.0, lr_embedding: float = 1e-6,
                          weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Optimizer parameter groups for LoRA+, in PEFT's order: A, embedding, B, B without decay.

    Raises ValueError for a non-positive lr/ratio or a model with nothing to train.
    """
    for name, v in (("lr", lr), ("ratio", ratio), ("lr_embedding", lr_embedding)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise ValueError(f"loraplus.{name}={v!r}: must be a positive number")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise ValueError(f"loraplus.weight_decay={weight_decay!r}: must be a number >= 0")
    roles, no_decay = _roles(model), _no_decay(model)
    groups: dict[str, list[nn.Parameter]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for p in _unique_trainable(model):
        role = roles.get(id(p), "B" if p.ndim == 1 else "A")
        if role == "B" and id(p) in no_decay:
            role = "B_no_decay"
        groups[role].append(p)
    if not any(groups.values()):
        raise ValueError("the model has no trainable parameters; inject an adapter first")
    return [
        {"name": "A", "params": groups["A"], "lr": lr, "weight_decay": weight_decay},
        {"name": "embedding", "params": groups["embedding"], "lr": lr_embedding, "weight_decay": weight_decay},
        {"name": "B", "params": groups["B"], "lr": lr * ratio, "weight_decay": weight_decay},
        {"name": "B_no_decay", "params": groups["B_no_decay"], "lr": lr * ratio, "weight_decay": 0.0},
    ]


def _unique_trainable(model: nn.Module) -> Iterator[nn.Parameter]:
    seen: set[int] = set()
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            yield p


def create_loraplus_optimizer(model: nn.Module, lr: float, ratio: float = 16.0, lr_embedding: float = 1e-6,
                              weight_decay: float = 0.0, optimizer_cls: type = torch.optim.AdamW,
                              **optimizer_kwargs: Any) -> torch.optim.Optimizer:
    """``optimizer_cls`` (AdamW by default) over ``loraplus_param_groups``; extra kwargs go to the optimizer."""
    groups = loraplus_param_groups(model, lr, ratio, lr_embedding, weight_decay)
    return optimizer_cls(groups, lr=lr, **optimizer_kwargs)
