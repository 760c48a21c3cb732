"""8-bit AdamW: bit for bit bitsandbytes' CPU AdamW8bit; checkpoints resume exactly."""

from __future__ import annotations

import copy

import pytest
import torch

from slimtune.optim import AdamW8bit, load_optimizer, save_optimizer


def net() -> torch.nn.Module:
    torch.manual_seed(0)  # 100x80 = 8000 values -> 8-bit state; 80, 10x80, 10 -> float32 state
    return torch.nn.Sequential(torch.nn.Linear(100, 80), torch.nn.ReLU(), torch.nn.Linear(80, 10))


def train(model, opt, steps: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 100, generator=g)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


def same_params(a, b) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_matches_bitsandbytes_bit_for_bit():
    bnb = pytest.importorskip("bitsandbytes")
    ours, theirs = net(), net()
    o1 = AdamW8bit(ours.parameters(), lr=1e-2, weight_decay=0.1)
    o2 = bnb.optim.AdamW8bit(theirs.parameters(), lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        x = torch.randn(16, 100, generator=g)
        for model, opt in ((ours, o1), (theirs, o2)):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
        assert same_params(ours, theirs)
    st = o1.state[ours[0].weight]
    assert st["exp_avg_codes"].dtype == torch.uint8 and st["exp_avg_absmax"].shape == (32,)  # ceil(8000 / 256)
    assert torch.equal(st["exp_avg_codes"], o2.state[theirs[0].weight]["state1"])
    assert o1.state[ours[2].weight]["exp_avg"].dtype == torch.float32  # small tensor: float32 moments


def test_state_is_a_quarter_of_adamw():
    model = net()
    opt = AdamW8bit(model.parameters(), min_8bit_size=0)
    train(model, opt, 1)
    # per value: two uint8 codes; per block of 256 values: two float32 maxima (vs 8 bytes per value in AdamW)
    expected = sum(2 * p.numel() + 2 * 4 * -(-p.numel() // 256) for p in model.parameters())
    assert opt.state_nbytes() == expected


@pytest.mark.parametrize("offloaded", [False, True])
def test_resume_from_checkpoint_is_exact(tmp_path, offloaded):
    from slimtune.optim import OffloadedOptimizer

    make = (lambda ps: OffloadedOptimizer(ps, AdamW8bit, lr=1e-2)) if offloaded else (lambda ps: AdamW8bit(ps, lr=1e-2))
    straight = net()
    train(straight, make(straight.parameters()), 6)

    first = net()
    opt = make(first.parameters())
    train(first, opt, 3)
    save_optimizer(opt, tmp_path / "opt.safetensors")
    weights = copy.deepcopy(first.state_dict())

    resumed = net()
    resumed.load_state_dict(weights)
    opt2 = make(resumed.parameters())
    load_optimizer(opt2, tmp_path / "opt.safetensors")
    st = opt2.state[resumed[0].weight]
    assert st["exp_avg_codes"].dtype == torch.uint8 and st["step"] == 3  # torch would cast codes to float
    train_rest(resumed, opt2)
    assert same_params(resumed, straight)


def train_rest(model, opt) -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(3):  # skip the first three batches, as the interrupted run saw them
        torch.randn(16, 100, generator=g)
    for _ in range(3):
        x = torch.randn(16, 100, generator=g)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


def test_bf16_params():
    model = net().to(torch.bfloat16)
    opt = AdamW8bit(model.parameters())
    before = model[0].weight.detach().clone()
    train_bf16 = lambda: model(torch.randn(4, 100, dtype=torch.bfloat16)).float().pow(2).mean().backward()  # noqa: E731
    train_bf16()
    opt.step()
    assert model[0].weight.dtype == torch.bfloat16 and not torch.equal(model[0].weight, before)


@pytest.mark.parametrize("kwargs, message", [
    ({"lr": -1.0}, "lr=-1.0"), ({"betas": (0.9, 1.0)}, r"betas\[1\]=1.0"), ({"eps": -1}, "eps=-1"),
    ({"betas": 0.9}, "betas=0.9"), ({"min_8bit_size": -5}, "min_8bit_size=-5"),
])
def test_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdamW8bit(net().parameters(), **kwargs)


def test_load_optimizer_errors(tmp_path):
    from safetensors.torch import save_file

    opt = AdamW8bit(net().parameters())
    with pytest.raises(FileNotFoundError, match="no such optimizer checkpoint"):
        load_optimizer(opt, tmp_path / "missing.safetensors")
    save_file({"x": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not a slimtune optimizer checkpoint"):
        load_optimizer(opt, tmp_path / "other.safetensors")
