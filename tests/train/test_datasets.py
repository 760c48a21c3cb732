"""The run's data side (slimtune.train.datasets): every shipped run config builds its data, splits hold out the
right unit (rows, or chunks of a text document), and chat eval sets give exact-match prompts."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from slimtune.assets import smollm2_path
from slimtune.train.config import DataSection, load_run_config
from slimtune.train.datasets import build_run_data

CONFIGS = sorted(p for p in Path("configs/train").glob("*.yaml") if p.stem != "diffusion")  # images: tests/diffusion


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(smollm2_path())


@pytest.fixture(scope="module")
def built(tokenizer):
    cache: dict = {}

    def build(data: DataSection):
        if data not in cache:
            cache[data] = build_run_data(data, tokenizer, seed=0)
        return cache[data]
    return build


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_builds_train_and_eval_data(path, built):
    cfg = load_run_config(path)
    data = built(cfg.data)
    assert len(data.train_rows) > 0 and len(data.eval_examples) > 0, path
    batch = data.batch(list(range(min(2, len(data.train_rows)))))
    assert batch["input_ids"].shape[0] == min(2, len(data.train_rows))


def test_a_single_text_document_holds_out_chunks(tmp_path, tokenizer):
    doc = tmp_path / "book.txt"
    doc.write_text(" ".join(f"word{i}" for i in range(3000)))
    data = build_run_data(DataSection(train=str(doc), format="text", max_length=64, eval_fraction=0.25),
                          tokenizer, seed=0)
    n = len(data.train_rows) + len(data.eval_examples)
    assert len(data.eval_examples) == round(n * 0.25) and len(data.train_rows) > 0


def test_chat_eval_rows_give_exact_match_prompts_without_the_answer(built):
    data = built(load_run_config(None).data)  # the bundled BBC News task
    assert len(data.conversations) == len(data.answers) == 50
    assert all(c[-1]["role"] == "user" for c in data.conversations)
    assert set(data.answers) <= {"business", "entertainment", "politics", "sport", "tech"}
