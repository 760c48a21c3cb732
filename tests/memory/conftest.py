"""Tiny random Hugging Face configs for the memory tests, as plain config.json dicts."""

from __future__ import annotations

import pytest

TINY = {
    "llama": {"model_type": "llama", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 64, "tie_word_embeddings": False},
    "gpt2": {"model_type": "gpt2", "vocab_size": 128, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 64,
             "bos_token_id": 0, "eos_token_id": 0},
    "bert": {"model_type": "bert", "vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "intermediate_size": 128, "max_position_embeddings": 64},
}


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_models(request):
    """Tiny models run on one CPU thread: their ops are so small that waking more threads costs more
    than the maths (tens of times more on a busy machine). Bytes saved do not depend on it; the slow
    (real SmolLM2) tests keep torch's default."""
    torch = None if request.node.get_closest_marker("slow") else _torch()
    if torch is None:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _torch():
    try:
        import torch
    except ImportError:  # the estimator's tests run without torch
        return None
    return torch
