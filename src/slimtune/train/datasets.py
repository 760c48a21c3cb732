"""The data side of a run: examples for training and evaluation, and the batches built from them.

Wraps ``slimtune.train.data`` (formats, packing, collation) for one run config: the bundled BBC News task when
``data.train`` is not set, an eval split (``data.eval`` or ``data.eval_fraction`` of the training file), packed
training rows, and held-out chat conversations whose short final answers can be scored by exact match.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from slimtune.train.data import DataStats, Example, bbc_topic_rows, collate, examples_from_rows, pack, read_rows

GENERATE_MAX = 50  # held-out conversations scored by exact match, before and after (each is a greedy decode)
ANSWER_MAX_WORDS = 4  # exact match only makes sense for short answers (a label, a word, a number)
BUNDLED_NAME = "<bundled BBC News topics>"


@dataclass
class RunData:
    train_rows: list  # packed rows (lists of Examples) or single Examples
    eval_examples: list[Example]
    stats: DataStats
    label_names: tuple[str, ...] | None
    conversations: list[list[dict[str, str]]]  # held-out prompts (chat) ...
    answers: list[str]  # ... and the replies they should get
    packed: bool
    pad_id: int
    device: torch.device = torch.device("cpu")  # where batches are built: a rank's GPU under torchrun + NCCL

    def batch(self, indices: Sequence[int]) -> dict[str, Tensor]:
        return self.on_device(collate([self.train_rows[i] for i in indices], self.pad_id, self.packed))

    def eval_batches(self, batch_size: int) -> list[dict[str, Tensor]]:
        ex = self.eval_examples
        return [self.on_device(collate(ex[i:i + batch_size], self.pad_id, False))
                for i in range(0, len(ex), batch_size)]

    def on_device(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: v.to(self.device) for k, v in batch.items()}


def _short_answer_prompts(rows: Sequence[dict]) -> tuple[list, list[str]]:
    """Chat rows ending in a short assistant reply: (the messages before it, the reply)."""
    prompts, answers = [], []
    for row in rows:
        messages = row.get("messages") or []
        if messages and messages[-1].get("role") == "assistant":
            reply = str(messages[-1].get("content", ""))
            if 0 < len(reply.split()) <= ANSWER_MAX_WORDS:
                prompts.append([{"role": m["role"], "content": m["content"]} for m in messages[:-1]])
                answers.append(reply)
    return prompts[:GENERATE_MAX], answers[:GENERATE_MAX]


def fmt_splits_rows(data_cfg: Any) -> bool:
    """Whether ``eval_fraction`` holds out rows (chat, alpaca, classification) or, for text, chunks: a text file
    is often one long document, so its held-out part is a share of its ``max_length`` chunks."""
    return data_cfg.format != "text"


def _rows(data_cfg: Any, seed: int, split: bool = True) -> tuple[str, list[dict], list[dict], int, str]:
    """(format, train rows, eval rows, skipped, train file name): the bundled set, or the user's files."""
    if data_cfg.train is None:  # the bundled default task (chat rows with their own eval split)
        return "chat", bbc_topic_rows("train", seed=seed), bbc_topic_rows("eval", seed=seed), 0, BUNDLED_NAME
    kw = dict(text_field=data_cfg.text_field, label_field=data_cfg.label_field,
              messages_field=data_cfg.messages_field, skip_bad_rows=data_cfg.skip_bad_rows)
    rows, skipped = read_rows(data_cfg.train, data_cfg.format, **kw)
    if data_cfg.eval is not None:
        eval_rows, _ = read_rows(data_cfg.eval, data_cfg.format, **kw)
    elif split:
        rows, eval_rows = _split(rows, data_cfg.eval_fraction, seed)
    else:
        eval_rows = []
    return data_cfg.format, rows, eval_rows, skipped, data_cfg.train


def build_run_data(data_cfg: Any, tokenizer: Any, seed: int) -> RunData:
    """Everything the run needs from ``data_cfg`` (a DataSection), every row checked before any model loads.
    Raises BadRow (file, row, field) and DataFileError from the readers."""
    fmt, train_rows, eval_rows, skipped, name = _rows(data_cfg, seed, split=fmt_splits_rows(data_cfg))
    train, stats, labels = examples_from_rows(train_rows, fmt, tokenizer, data_cfg.max_length, file=name)
    evals = (examples_from_rows(eval_rows, fmt, tokenizer, data_cfg.max_length, file=data_cfg.eval or name,
                                label_names=labels)[0] if eval_rows else [])
    if not fmt_splits_rows(data_cfg) and data_cfg.eval is None:  # text: hold out chunks, not whole documents
        train, evals = _split(train, data_cfg.eval_fraction, seed)
    packed = data_cfg.packing and fmt != "classification"
    rows = pack(train, data_cfg.max_length) if packed else list(train)
    prompts, answers = _short_answer_prompts(eval_rows) if fmt == "chat" else ([], [])
    return RunData(rows, evals, dataclasses.replace(stats, skipped=skipped), labels, prompts, answers, packed,
                   tokenizer.pad_token_id)


def _split(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out ``fraction`` of the rows or examples (a seeded shuffle picks which), keeping order in both parts."""
    if fraction <= 0:
        return rows, []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = set(order[:max(1, int(round(len(rows) * fraction)))])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]
