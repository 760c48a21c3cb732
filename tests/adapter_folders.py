"""Helpers for adapter-folder tests: model snapshots (state dict, requires_grad flags, registry) and file surgery."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def snapshot(model):
    """Everything a failed load must leave as it was: tensor bytes, flags, modules, adapter registry."""
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            [(n, p.requires_grad) for n, p in model.named_parameters()],
            [(n, type(m).__name__) for n, m in model.named_modules()],
            dict(model.__dict__.get("slimtune_configs", {"<absent>": None})),
            model.__dict__.get("slimtune_active", "<absent>"))


def assert_unchanged(model, before) -> None:
    state, flags, modules, configs, active = snapshot(model)
    assert list(state) == list(before[0]), "state dict keys changed"
    for k, v in before[0].items():  # byte-equal, NaN-safe
        assert v.dtype == state[k].dtype and v.shape == state[k].shape, k
        assert torch.equal(_bits(v), _bits(state[k])), f"{k} changed"
    assert flags == before[1], "requires_grad flags changed"
    assert modules == before[2], "module structure changed"
    assert configs == before[3] and active == before[4], "adapter registry changed"


def _bits(t):
    return t.reshape(-1).view(torch.uint8) if t.is_floating_point() else t


def tiny_llama_seeded(seed: int):
    """tests.conftest.tiny_llama's architecture with weights from another seed: another base model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def read_tensors(folder: Path):
    with safe_open(str(folder / WEIGHTS), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def write_tensors(folder: Path, tensors, meta) -> None:
    save_file(tensors, str(folder / WEIGHTS), metadata=meta)


def edit_config(folder: Path, **changes) -> None:
    d = json.loads((folder / CONFIG).read_text())
    for k, v in changes.items():
        if v is ...:
            d.pop(k, None)
        else:
            d[k] = v
    (folder / CONFIG).write_text(json.dumps(d))
