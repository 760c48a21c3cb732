"""Batches: padding (one example per row) or packing (several examples per row, kept apart).

A packed row concatenates examples and restarts ``position_ids`` at 0 for each one; no ``attention_mask`` is
returned. With ``position_ids``, no attention mask and ``use_cache=False``, transformers 5 (``masking_utils.
find_packed_sequence_indices``) builds a block-diagonal causal mask for sdpa and eager attention, so examples
never attend to each other and each gets the loss it would get alone. Each example's first label is -100: the
model shifts labels by one, so that label would otherwise be predicted from the previous example's last token.
Row padding after the last example is its own block (positions restart at 0) with labels -100.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from slimtune.train.data.formats import IGNORE, Example


def pack(examples: Sequence[Example], max_length: int) -> list[list[Example]]:
    """Greedy, order-preserving packing: fill a row until the next example would pass ``max_length``.

    Deterministic (a pure function of the inputs). Raises ValueError for an example longer than ``max_length``
    (encode truncates, so this means a mismatched max_length) or a classification example (not packable).
    """
    rows: list[list[Example]] = []
    used = max_length + 1  # forces a new row for the first example
    for i, ex in enumerate(examples):
        if ex.label is not None:
            raise ValueError("classification examples cannot be packed (one label per sequence); use packing: false")
        n = len(ex.input_ids)
        if n > max_length:
            raise ValueError(f"example {i} has {n} tokens, more than max_length={max_length}")
        if used + n > max_length:
            rows.append([])
            used = 0
        rows[-1].append(ex)
        used += n
    return rows


def row_lengths(batch: Sequence[Example] | Sequence[list[Example]], packed: bool) -> list[int]:
    """Tokens in each row of a batch (before padding)."""
    if packed:
        return [sum(len(e.input_ids) for e in row) for row in batch]
    return [len(e.input_ids) for e in batch]


def padding_waste(batch: Sequence[Example] | Sequence[list[Example]], packed: bool) -> float:
    """Fraction of the collated batch's positions that are padding (rows padded to the longest one)."""
    lengths = row_lengths(batch, packed)
    return 1.0 - sum(lengths) / (len(lengths) * max(lengths))


def packed_row(row: Sequence[Example], width: int, pad_id: int) -> tuple[list[int], list[int], list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for ex in row:
        ids += ex.input_ids
        labels += [IGNORE] + list(ex.labels[1:])  # the boundary rule, enforced here too
        positions += range(len(ex.input_ids))
    pad = width - len(ids)
    return ids + [pad_id] * pad, labels + [IGNORE] * pad, positions + list(range(pad))


def collate(batch: Sequence[Example] | Sequence[list[Example]], pad_id: int, packed: bool) -> dict[str, torch.Tensor]:
    """Tensors for one batch, right-padded to the longest row with ``pad_id``.

    - padded (``packed=False``, a sequence of Examples): ``input_ids``, ``labels`` (-100 on pads; a real EOS equal
      to ``pad_id`` keeps its label), ``attention_mask``; all (B, L) int64.
    - packed (``packed=True``, a sequence of ``pack`` rows): ``input_ids``, ``labels``, ``position_ids`` (B, L);
      no attention_mask (see the module docstring).
    - classification Examples (``label`` set): ``input_ids``, ``attention_mask`` (B, L) and ``labels`` (B,).

    Raises ValueError on an empty batch, a batch whose shape does not match ``packed``, or packed classification.
    """
    if not batch:
        raise ValueError("collate: empty batch")
    if packed:
        if not all(isinstance(row, (list, tuple)) and row for row in batch):
            raise ValueError("collate(packed=True) takes rows from pack(): non-empty lists of Examples")
        if any(ex.label is not None for row in batch for ex in row):
            raise ValueError("classification examples cannot be packed; use packing: false")
        width = max(row_lengths(batch, True))
        cols = [packed_row(row, width, pad_id) for row in batch]
        return {name: torch.tensor([c[k] for c in cols], dtype=torch.long)
                for k, name in enumerate(("input_ids", "labels", "position_ids"))}
    if not all(isinstance(ex, Example) for ex in batch):
        raise ValueError("collate(packed=False) takes a sequence of Examples")
    width = max(row_lengths(batch, False))
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    for i, ex in enumerate(batch):
        n = len(ex.input_ids)
        ids[i, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        mask[i, :n] = 1
        if ex.label is None:
            labels[i, :n] = torch.tensor(ex.labels, dtype=torch.long)  # per token, never from the pad mask
    classes = [ex.label for ex in batch]
    if any(c is not None for c in classes):
        if any(c is None for c in classes):
            raise ValueError("collate: a batch mixes classification and token-label examples")
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor(classes, dtype=torch.long)}
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
