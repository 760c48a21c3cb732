"""lr_factor against hand-worked numbers for each kind, and the LambdaLR that applies it."""

from __future__ import annotations

import json
import math

import pytest
import torch

from slimtune.train.schedule import lr_factor, make_scheduler


def test_warmup_ramps_linearly_up_to_the_base_rate():
    # warmup=4: steps 0..3 get 1/4, 2/4, 3/4, 4/4 (no step wasted on lr 0)
    assert [lr_factor(s, 10, 4, "cosine") for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert [lr_factor(s, 10, 4, "linear") for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_linear_decays_to_zero_at_total():
    # total=10, warmup=4: progress = (s - 4) / 6
    assert lr_factor(4, 10, 4, "linear") == 1.0
    assert lr_factor(7, 10, 4, "linear") == pytest.approx(0.5)
    assert lr_factor(9, 10, 4, "linear") == pytest.approx(1 / 6)
    assert lr_factor(10, 10, 4, "linear") == 0.0
    assert lr_factor(15, 10, 4, "linear") == 0.0


def test_cosine_halfway_is_one_half_and_ends_at_zero():
    assert lr_factor(0, 10, 0, "cosine") == 1.0
    assert lr_factor(5, 10, 0, "cosine") == pytest.approx(0.5)
    assert lr_factor(2, 10, 0, "cosine") == pytest.approx(0.5 * (1 + 0.8090169943749475))  # cos(pi/5)
    assert lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5)  # progress 4/8
    assert lr_factor(10, 10, 0, "cosine") == pytest.approx(0.0, abs=1e-15)
    assert lr_factor(12, 10, 0, "cosine") == pytest.approx(0.0, abs=1e-15)


def test_constant_is_one_after_warmup():
    assert [lr_factor(s, 5, 2, "constant") for s in range(7)] == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("args, field", [((0, 10, 0, "exp"), "kind='exp'"), ((0, 0, 0, "cosine"), "total=0"),
                                         ((0, 10, -1, "cosine"), "warmup=-1"), ((-1, 10, 0, "cosine"), "step=-1")])
def test_bad_arguments_are_named(args, field):
    with pytest.raises(ValueError, match=field.replace("(", r"\(")):
        lr_factor(*args)


def test_scheduler_scales_every_group_and_saves_as_json():
    p1, p2 = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [p1], "lr": 0.1}, {"params": [p2], "lr": 1.6}])  # LoRA+-style groups
    sched = make_scheduler(opt, total=4, warmup=2, kind="linear")
    seen = []
    for _ in range(4):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    # factors for steps 0..3: 1/2, 1, 1 (progress 0/2), 1/2 (progress 1/2)
    want = [[0.05, 0.8], [0.1, 1.6], [0.1, 1.6], [0.05, 0.8]]
    assert all(math.isclose(a, b) for row, wrow in zip(seen, want) for a, b in zip(row, wrow)), seen
    state = json.loads(json.dumps(sched.state_dict()))
    fresh = make_scheduler(torch.optim.SGD([{"params": [p1], "lr": 0.1}, {"params": [p2], "lr": 1.6}]), 4, 2, "linear")
    fresh.load_state_dict(state)
    assert fresh.state_dict() == sched.state_dict()
