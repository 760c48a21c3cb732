"""Grid parsing, run names and device assignment (pure functions, no runs)."""

from __future__ import annotations

import pytest

from slimtune.sweep.grid import GridError, combinations, parse_axis, parse_grid, run_name
from slimtune.sweep.runner import assign_devices, device_env


def test_values_are_yaml_and_brackets_keep_their_commas():
    axis = parse_axis("adapter.target_modules=[q_proj,v_proj],all-linear")
    assert axis.key == "adapter.target_modules"
    assert axis.texts == ("[q_proj,v_proj]", "all-linear")
    assert axis.values == (["q_proj", "v_proj"], "all-linear")
    assert parse_axis("adapter.r=4,8,16").values == (4, 8, 16)
    assert parse_axis("train.lr=1e-4, 3.0e-4").texts == ("1e-4", "3.0e-4")


def test_combinations_cover_the_product_first_axis_slowest():
    axes = parse_grid(["adapter.r=4,8", "train.lr=1e-4,3e-4,1e-3"])
    combos = combinations(axes)
    assert len(combos) == 6 and len({tuple(c.items()) for c in combos}) == 6
    assert combos[0] == {"adapter.r": "4", "train.lr": "1e-4"}
    assert combos[3] == {"adapter.r": "8", "train.lr": "1e-4"}
    names = [run_name(i, c) for i, c in enumerate(combos, 1)]
    assert names[0] == "001-r=4-lr=1e-4" and len(set(names)) == 6


@pytest.mark.parametrize("text, message", [
    ("adapter.r", "--grid 'adapter.r': must be key.path=value1,value2"),
    ("adapter r=4", "--grid 'adapter r=4': must be key.path=value1,value2"),
    ("adapter.r=4,,8", "--grid 'adapter.r=4,,8': an empty value"),
    ("adapter.r=4,4", "--grid 'adapter.r=4,4': a value is repeated"),
    ("adapter.target_modules=[q_proj,v_proj", "unbalanced brackets"),
])
def test_bad_axes_are_named(text, message):
    with pytest.raises(GridError) as info:
        parse_axis(text)
    assert message in str(info.value)


def test_a_key_given_twice_or_no_axis_is_refused():
    with pytest.raises(GridError, match="--grid adapter.r: given twice"):
        parse_grid(["adapter.r=4", "adapter.r=8"])
    with pytest.raises(GridError, match="give at least one axis"):
        parse_grid([])


@pytest.mark.parametrize("n, devices, want", [
    (3, [], ["cpu", "cpu", "cpu"]),
    (3, ["cpu"], ["cpu", "cpu", "cpu"]),
    (5, ["cuda:0", "cuda:1"], ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]),
    (2, ["cuda:0", "cuda:1", "cuda:2"], ["cuda:0", "cuda:1"]),
])
def test_one_run_per_device_round_robin(n, devices, want):
    assert assign_devices(n, devices) == want


def test_a_run_sees_only_its_gpu():
    assert device_env("cuda:1")["CUDA_VISIBLE_DEVICES"] == "1"
    assert device_env("cpu")["CUDA_VISIBLE_DEVICES"] == ""
