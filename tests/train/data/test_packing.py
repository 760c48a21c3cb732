"""Packing on a tiny Llama: packed rows give each example exactly the loss it gets alone (sdpa and eager)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slimtune.train.data import IGNORE, Example, collate, pack, padding_waste
from tests.conftest import tiny_llama

PAD = 0


def make_example(n: int, n_prompt: int, seed: int) -> Example:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (n,), generator=g).tolist()
    labels = [IGNORE] * n_prompt + ids[n_prompt:]  # a prompt (no loss), then a trained response
    return Example(ids, labels)


def example_loss_sum(logits: torch.Tensor, labels: list[int]) -> tuple[torch.Tensor, int]:
    """Summed next-token CE over one example's own positions: logits (n, V), labels (n,)."""
    target = torch.tensor(labels[1:])
    return F.cross_entropy(logits[:-1], target, ignore_index=IGNORE, reduction="sum"), int((target != IGNORE).sum())


def model_with(attn: str):
    model = tiny_llama()
    model.config._attn_implementation = attn
    return model


EXAMPLES = [make_example(9, 3, 1), make_example(14, 5, 2), make_example(6, 2, 3), make_example(17, 4, 4),
            make_example(5, 1, 5), make_example(11, 6, 6)]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_per_example_loss_equals_unpacked(attn):
    model = model_with(attn)
    rows = pack(EXAMPLES, 32)
    assert len(rows) >= 2 and max(len(r) for r in rows) >= 2  # several examples per row, and row padding
    batch = collate(rows, pad_id=PAD, packed=True)
    assert "attention_mask" not in batch
    with torch.no_grad():
        packed_logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                              use_cache=False).logits
        total, count = 0.0, 0
        for r, row in enumerate(rows):
            off = 0
            for ex in row:
                n = len(ex.input_ids)
                alone = model(input_ids=torch.tensor([ex.input_ids]), use_cache=False).logits[0]
                got, _ = example_loss_sum(packed_logits[r, off: off + n], ex.labels)
                want, k = example_loss_sum(alone, ex.labels)
                assert torch.allclose(got, want, atol=1e-5, rtol=0), (attn, r, off, got.item(), want.item())
                total, count, off = total + want, count + k, off + n
        # the model's own shifted loss over the packed batch: no term crosses an example boundary
        loss = model(**batch, use_cache=False).loss
    assert torch.allclose(loss, total / count, atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_no_attention_across_examples_in_a_packed_row(attn):
    model = model_with(attn)
    a, b = EXAMPLES[0], EXAMPLES[1]
    a2 = Example([(t % 127) + 1 for t in a.input_ids[::-1]], a.labels)  # same length, other tokens
    n = len(a.input_ids)
    with torch.no_grad():
        first = collate([[a, b]], PAD, packed=True)
        second = collate([[a2, b]], PAD, packed=True)
        out1 = model(input_ids=first["input_ids"], position_ids=first["position_ids"], use_cache=False).logits
        out2 = model(input_ids=second["input_ids"], position_ids=second["position_ids"], use_cache=False).logits
        assert torch.equal(out1[0, n:], out2[0, n:])
        # control: with one running position sequence (no restart) example b does see example a
        flat = torch.arange(first["input_ids"].shape[1])[None]
        c1 = model(input_ids=first["input_ids"], position_ids=flat, use_cache=False).logits
        c2 = model(input_ids=second["input_ids"], position_ids=flat, use_cache=False).logits
    assert not torch.allclose(c1[0, n:], c2[0, n:], atol=1e-3)


def test_boundary_label_rule_first_token_of_each_example_is_not_trained():
    # labels that (wrongly) train every token, the first one included
    a, b = Example([5, 6, 7], [5, 6, 7]), Example([8, 9], [8, 9])
    batch = collate([[a, b]], PAD, packed=True)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    # token 8 would be predicted from token 7 (the previous example's last position): masked
    assert batch["labels"].tolist() == [[IGNORE, 6, 7, IGNORE, 9]]


def test_packed_rows_pad_with_their_own_block_and_no_loss():
    a, b = Example([5, 6, 7], [IGNORE, 6, 7]), Example([8, 9], [IGNORE, 9])
    c = Example([3, 4, 5, 6, 7, 8], [IGNORE, 4, 5, 6, 7, 8])
    batch = collate([[a, b], [c]], pad_id=2, packed=True)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 2], [3, 4, 5, 6, 7, 8]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]
    assert batch["labels"][0, -1] == IGNORE


def test_pack_is_greedy_order_preserving_and_deterministic():
    lengths = [5, 4, 3, 8, 2, 2, 7]
    examples = [Example(list(range(1, n + 1)), [IGNORE] + list(range(2, n + 1))) for n in lengths]
    rows = pack(examples, 10)
    assert [[len(e.input_ids) for e in r] for r in rows] == [[5, 4], [3], [8, 2], [2, 7]]
    assert [e for r in rows for e in r] == examples
    assert pack(examples, 10) == rows
    with pytest.raises(ValueError, match="example 3 has 8 tokens, more than max_length=7"):
        pack(examples, 7)


def test_pack_and_collate_refuse_classification_examples():
    ex = Example([1, 2, 3], [], label=1)
    with pytest.raises(ValueError, match="classification examples cannot be packed"):
        pack([ex], 8)
    with pytest.raises(ValueError, match="classification examples cannot be packed"):
        collate([[ex]], PAD, packed=True)


def test_padded_collate_and_classification_collate():
    a, b = Example([5, 6, 7], [IGNORE, 6, 7]), Example([8, 9], [IGNORE, 9])
    batch = collate([a, b], pad_id=2, packed=False)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 2]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [IGNORE, 9, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    cls = collate([Example([5, 6, 7], [], 2), Example([8], [], 0)], pad_id=2, packed=False)
    assert cls["labels"].tolist() == [2, 0] and cls["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    with pytest.raises(ValueError, match="takes a sequence of Examples"):
        collate([[a]], PAD, packed=False)
    with pytest.raises(ValueError, match="takes rows from pack"):
        collate([a], PAD, packed=True)


def test_padding_waste_counts_pad_positions():
    a, b = Example([1] * 6, [IGNORE] * 6), Example([1] * 2, [IGNORE] * 2)
    assert padding_waste([a, b], packed=False) == pytest.approx(4 / 12)
    assert padding_waste([[a, b]], packed=True) == 0.0
