"""EpochSampler: permutations per epoch, batches across epoch ends, determinism, state round trip."""

from __future__ import annotations

import json
import random

import pytest
import torch

from slimtune.train.sampler import EpochSampler


def _stream(sampler: EpochSampler, batches: int) -> list[int]:
    return [i for _ in range(batches) for i in sampler.next_batch()]


def test_each_epoch_is_a_permutation_and_batches_cross_epoch_ends():
    s = EpochSampler(7, 3, seed=5)
    out = _stream(s, 7)  # 21 indices = exactly 3 epochs
    assert all(len(b) == 3 for b in [out[i:i + 3] for i in range(0, 21, 3)])
    epochs = [out[i:i + 7] for i in range(0, 21, 7)]
    assert all(sorted(e) == list(range(7)) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1, "every epoch has the same order"
    assert s.state()["epoch"] == 3 and s.state()["pos"] == 0


def test_same_seed_same_order_other_seed_other_order_global_rngs_irrelevant():
    a = _stream(EpochSampler(50, 8, seed=1), 10)
    random.seed(123)
    torch.manual_seed(123)
    b = _stream(EpochSampler(50, 8, seed=1), 10)
    assert a == b
    assert a != _stream(EpochSampler(50, 8, seed=2), 10)


def test_state_round_trip_through_json_continues_the_stream():
    s = EpochSampler(10, 4, seed=0)
    _stream(s, 4)  # 16 indices: inside epoch 1
    state = json.loads(json.dumps(s.state()))
    want = _stream(s, 5)
    t = EpochSampler(10, 4, seed=0)
    t.load_state(state)
    assert _stream(t, 5) == want


@pytest.mark.parametrize("change, field", [({"n": 11}, "n=11"), ({"batch_size": 2}, "batch_size=2"),
                                           ({"seed": 9}, "seed=9"), ({"pos": 10}, "pos=10"),
                                           ({"epoch": -1}, "epoch=-1")])
def test_mismatched_or_bad_state_is_named(change, field):
    s = EpochSampler(10, 4, seed=0)
    with pytest.raises(ValueError, match=field):
        s.load_state({**s.state(), **change})
    assert s.state()["epoch"] == 0 and s.state()["pos"] == 0


@pytest.mark.parametrize("args, field", [((0, 4, 0), "n=0"), ((5, 0, 0), "batch_size=0"), ((5, 2, -1), "seed=-1")])
def test_bad_arguments_are_named(args, field):
    with pytest.raises(ValueError, match=field):
        EpochSampler(*args)
