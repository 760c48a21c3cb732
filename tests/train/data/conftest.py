"""Shared fixtures for the train-data tests: the real SmolLM2 tokenizer (a cached HF folder, fast to load)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smol_tok():
    from transformers import AutoTokenizer

    from slimtune.assets import smollm2_path

    return AutoTokenizer.from_pretrained(smollm2_path())
