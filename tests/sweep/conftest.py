"""A tiny model folder (random Llama weights, SmolLM2's tokenizer) and a small text file: fast sweep runs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


def tiny_model_folder(path: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from slimtune.assets import smollm2_path

    src = smollm2_path()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (src / name).is_file():
            shutil.copy(src / name, path / name)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return tiny_model_folder(tmp_path_factory.mktemp("sweep") / "tiny-llama")


@pytest.fixture
def sweep_config(tmp_path, tiny_model) -> Path:
    """A run config: the tiny model, plain-text rows with a held-out split, a few steps, checkpoints each step."""
    import json

    from slimtune.data import shakespeare_text

    lines = [line for line in shakespeare_text("romeo").splitlines() if len(line) > 30][:48]
    (tmp_path / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    (tmp_path / "run.yaml").write_text(f"""
model: {{name: {tiny_model}}}
adapter: {{method: lora, r: 4, alpha: 8, target_modules: all-linear}}
data: {{train: {tmp_path / 'text.jsonl'}, format: text, eval_fraction: 0.25, max_length: 32, packing: false}}
train: {{max_steps: 3, batch_size: 4, lr: 1.0e-3, warmup: 0, save_every: 1, eval_every: null, log_every: 1}}
output_dir: {tmp_path / 'out'}
""")
    return tmp_path / "run.yaml"
