"""Gradient accumulation weighted by what is trained: micro-batches with unequal numbers of trained tokens
(packing, chat masking) or rows (a classifier's last, short batch) give the gradient of the mean loss over
everything the step trains, as one big batch does (the oracle: plain autograd on the model's own mean loss
over the concatenated batch), and the logged loss is that mean."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import slimtune
from slimtune.train.loop import LoopConfig, TrainingDiverged, count_trained, summed_loss, train_loop
from slimtune.train.sampler import EpochSampler
from slimtune.train.schedule import make_scheduler
from tests.conftest import randomize_adapters, tiny_llama, tokens

SEQ = 12
IDS = torch.randint(0, 128, (4, SEQ), generator=torch.Generator().manual_seed(3))
MASKED = [0, 3, 7, 10]  # row i's first MASKED[i] labels are -100: 11, 9, 5, 2 trained tokens after the shift


def _labels(rows: list[int]) -> torch.Tensor:
    labels = IDS[rows].clone()
    for j, row in enumerate(rows):
        labels[j, :MASKED[row]] = -100
    return labels


def _lora(model):
    slimtune.inject(model, slimtune.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    randomize_adapters(model)
    return model


def _tiny_classifier():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, num_labels=3,
                      pad_token_id=0)
    return _lora(LlamaForSequenceClassification(cfg).eval())


def _loop_gradient(model, make_batch, tmp_path: Path, grad_accum: int = 2, batch_size: int = 2) -> dict:
    """One SGD step at lr 1 without clipping: the weights move by exactly the accumulated gradient."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.SGD(params.values(), lr=1.0)
    train_loop(model, opt, make_scheduler(opt, 1, 0, "constant"), EpochSampler(4, batch_size, seed=0), make_batch,
               LoopConfig(max_steps=1, grad_accum=grad_accum, max_grad_norm=None), tmp_path)
    return {n: before[n] - p.detach() for n, p in params.items()}


def _oracle_gradient(model, batch: dict) -> tuple[dict, float]:
    """Plain autograd on the model's own mean loss over one batch holding every micro-batch's rows."""
    model.train()
    loss = model(**batch).loss
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, float(loss.detach())


def _assert_close(got: dict, want: dict) -> None:
    assert max(float(g.abs().max()) for g in want.values()) > 1e-3  # the step really moved the weights
    worst = max(float((got[n] - want[n]).abs().max()) for n in want)
    assert worst < 1e-6, worst


def test_unequal_trained_tokens_accumulate_to_the_one_batch_gradient_and_logged_loss(tmp_path):
    counts = []

    def make_batch(indices):
        batch = {"input_ids": IDS[indices], "labels": _labels(indices)}
        counts.append(count_trained(batch))
        return batch

    got = _loop_gradient(_lora(tiny_llama()), make_batch, tmp_path)
    assert len(counts) == 2 and counts[0] != counts[1] and sum(counts) == 27  # unequal micro-batches
    want, want_loss = _oracle_gradient(_lora(tiny_llama()), {"input_ids": IDS, "labels": _labels([0, 1, 2, 3])})
    _assert_close(got, want)
    logged = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert logged == pytest.approx(want_loss, rel=1e-6)


def test_a_micro_batch_with_no_trained_token_adds_nothing_instead_of_nan(tmp_path):
    drawn = []

    def make_batch(indices):
        drawn.append(indices)
        labels = IDS[indices].clone()
        if len(drawn) == 1:  # the first micro-batch trains nothing (a prompt-only chunk)
            labels[:] = -100
        return {"input_ids": IDS[indices], "labels": labels}

    got = _loop_gradient(_lora(tiny_llama()), make_batch, tmp_path)
    second = drawn[1]
    want, _ = _oracle_gradient(_lora(tiny_llama()), {"input_ids": IDS[second], "labels": IDS[second]})
    _assert_close(got, want)


def test_a_step_with_no_trained_token_at_all_stops_as_diverged(tmp_path):
    def make_batch(indices):
        return {"input_ids": IDS[indices], "labels": torch.full_like(IDS[indices], -100)}

    with pytest.raises(TrainingDiverged, match="step 1"):
        _loop_gradient(_lora(tiny_llama()), make_batch, tmp_path)


def test_classifier_micro_batches_are_weighted_by_rows(tmp_path):
    classes = torch.tensor([0, 2, 1, 2])

    def make_batch(indices):
        rows = [i for i in indices if i != 0] or indices  # row 0 dropped: one micro-batch has a single row
        return {"input_ids": IDS[rows], "labels": classes[rows]}

    rows = []

    def counted(indices):
        batch = make_batch(indices)
        rows.append(len(batch["labels"]))
        return batch

    got = _loop_gradient(_tiny_classifier(), counted, tmp_path)
    assert sorted(rows) == [1, 2]
    want, _ = _oracle_gradient(_tiny_classifier(), {"input_ids": IDS[1:], "labels": classes[1:]})
    _assert_close(got, want)


def test_count_trained_counts_labels_after_the_shift_or_rows():
    labels = torch.tensor([[5, -100, 7, 8], [-100, -100, -100, 9]])
    assert count_trained({"labels": labels}) == 3  # the first column is never predicted
    assert count_trained({"labels": torch.tensor([1, 0, 2])}) == 3


def test_prompt_tuning_loss_scores_only_the_real_tokens():
    """Virtual tokens are prepended to the logits; the summed loss must equal the model's own (mean) loss, which
    the prompt hook computes with -100 labels on the virtual positions, times the trained-token count."""
    model = tiny_llama()
    slimtune.prepare(model, slimtune.PromptTuningConfig(num_virtual_tokens=4))
    ids = tokens(batch=2, seq=10, seed=4)
    labels = ids.clone()
    labels[:, :3] = -100
    batch = {"input_ids": ids, "labels": labels}
    with torch.no_grad():
        ours = summed_loss(model, batch)
        reference = model(input_ids=ids, labels=labels).loss * count_trained(batch)
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
