"""The default run's bundled data: BBC News topic rows (deterministic, balanced, disjoint) and Shakespeare."""

from __future__ import annotations

from collections import Counter

import pytest

from slimtune.train.data import bbc_topic_rows, encode, shakespeare_slice
from slimtune.train.data.bundled import QUESTION, bbc_root, read_article
from slimtune.train.data.rows import check_row

TOPICS = {"business", "entertainment", "politics", "sport", "tech"}


def answers(rows):
    return [r["messages"][-1]["content"] for r in rows]


def test_split_is_balanced_disjoint_and_complete():
    train, ev = bbc_topic_rows("train"), bbc_topic_rows("eval")
    distinct = {" ".join(read_article(f).split()[:90]) for f in bbc_root().glob("*/*.txt")}
    assert len(train) + len(ev) == len(distinct) and len(ev) == 100
    assert Counter(answers(ev)) == {t: 20 for t in TOPICS}
    assert set(answers(train)) == TOPICS
    train_texts = [r["messages"][0]["content"] for r in train]
    assert len(set(train_texts)) == len(train_texts)  # duplicated corpus articles appear once
    assert not set(train_texts) & {r["messages"][0]["content"] for r in ev}  # and never in both splits


def test_split_is_deterministic_and_seeded():
    assert bbc_topic_rows("eval", seed=3, n_eval=12) == bbc_topic_rows("eval", seed=3, n_eval=12)
    assert bbc_topic_rows("eval", seed=3, n_eval=12) != bbc_topic_rows("eval", seed=4, n_eval=12)
    assert Counter(answers(bbc_topic_rows("eval", n_eval=12))) == {"business": 3, "entertainment": 3,
                                                                  "politics": 2, "sport": 2, "tech": 2}


def test_rows_are_valid_chat_rows_that_fit_256_tokens(smol_tok):
    rows = bbc_topic_rows("eval")
    for i, row in enumerate(rows, 1):
        assert check_row(row, "chat", "<bbc>", i)["messages"] == row["messages"]
        assert row["messages"][0]["content"].startswith(QUESTION + "\n\n")
    lengths = []
    for row in rows:
        (ex,), cut = encode(row, "chat", smol_tok, 256)
        assert not cut
        lengths.append(len(ex.input_ids))
        trained = smol_tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != -100])
        assert trained == row["messages"][-1]["content"] + "<|im_end|>"
    assert max(lengths) <= 256


def test_bad_arguments():
    with pytest.raises(ValueError, match="split='test': must be one of train, eval"):
        bbc_topic_rows("test")
    with pytest.raises(ValueError, match="n_eval=3: must be between 5 and 500"):
        bbc_topic_rows("eval", n_eval=3)


def test_shakespeare_slice():
    text = shakespeare_slice(5000)
    assert 4000 < len(text) <= 5000 and text.endswith("\n")
    assert "HAMLET:" in shakespeare_slice(20_000)
