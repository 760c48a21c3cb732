"""Adapter folders for serving tests: written by slimtune (inject + save_adapter) and by PEFT (save_pretrained)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from tests.conftest import randomize_adapters, tiny_llama


def slimtune_adapter(base, folder: Path, seed: int, std: float = 0.2, **lora) -> Path:
    """Inject a LoRA (``lora`` -> LoraConfig) into a copy of ``base``, give it random weights, save it."""
    from slimtune.config import LoraConfig
    from slimtune.files import save_adapter
    from slimtune.injection import inject

    model = copy.deepcopy(base)
    inject(model, LoraConfig(**lora))
    randomize_adapters(model, std=std, seed=seed)
    return save_adapter(model, folder)


def peft_adapter(base, folder: Path, seed: int, std: float = 0.2, **lora) -> Path:
    """The same with Hugging Face PEFT (its own config and key names; no slimtune metadata)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(base), LoraConfig(**lora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    model.save_pretrained(folder)
    return folder


def bottleneck_adapter(base, folder: Path, seed: int, std: float = 0.3, **cfg) -> Path:
    """A slimtune bottleneck adapter (``cfg`` -> BottleneckConfig) with random weights, saved."""
    from slimtune.config import BottleneckConfig
    from slimtune.files import save_adapter
    from slimtune.injection import inject

    model = copy.deepcopy(base)
    inject(model, BottleneckConfig(**cfg))
    randomize_adapters(model, std=std, seed=seed)
    return save_adapter(model, folder)


def merged_oracle(base, folder: Path):
    """PEFT's PeftModel.from_pretrained on a copy of ``base``, merged: the reference for one adapter."""
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).merge_and_unload().eval()


def three_adapters(tmp_path: Path):
    """(base, {name: folder}): slimtune r=4 on q,v; slimtune r=8 on all-linear; PEFT r=2 on k,o,up."""
    base = tiny_llama()
    folders = {
        "qv4": slimtune_adapter(base, tmp_path / "qv4", 1, r=4, alpha=8, target_modules=("q_proj", "v_proj")),
        "all8": slimtune_adapter(base, tmp_path / "all8", 2, r=8, alpha=4, target_modules="all-linear"),
        "peft2": peft_adapter(base, tmp_path / "peft2", 3, r=2, lora_alpha=6,
                              target_modules=["k_proj", "o_proj", "up_proj"]),
    }
    return base, folders


def tiny_vocab_llama(seed: int = 0, layers: int = 2):
    """A tiny random Llama with SmolLM2's vocabulary (49,152), so the real tokenizer and chat template apply."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      eos_token_id=2, bos_token_id=1, pad_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def bottleneck_oracle(base, folder):
    """The maths, not slimtune's layer: ``base`` with forward hooks adding s * up(act(down(h))) to each adapted
    layer's output h, from the file's own tensors and config."""
    import json

    from safetensors.torch import load_file

    cfg = json.loads((folder / "adapter_config.json").read_text())["slimtune_config"]
    act = {"relu": torch.relu, "gelu": torch.nn.functional.gelu, "tanh": torch.tanh,
           "silu": torch.nn.functional.silu}[cfg["nonlinearity"]]
    t = load_file(folder / "adapter_model.safetensors")
    model = copy.deepcopy(base)
    for key in [k for k in t if k.endswith("adapter_down.weight")]:
        name = key[len("base_model.model."):-len(".adapter_down.weight")]
        p = key[:-len("adapter_down.weight")]

        def hook(module, args, h, p=p):
            z = act(torch.nn.functional.linear(h, t[p + "adapter_down.weight"], t[p + "adapter_down.bias"]))
            return h + cfg["scale"] * torch.nn.functional.linear(z, t[p + "adapter_up.weight"], t[p + "adapter_up.bias"])
        model.get_submodule(name).register_forward_hook(hook)
    return model
