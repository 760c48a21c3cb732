"""The offloading wrapper: same numbers as the optimizer it wraps, state on the host between steps."""

from __future__ import annotations

import pytest
import torch

from slimtune.optim import AdamW8bit, OffloadedOptimizer


def net(device="cpu") -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(100, 80), torch.nn.Tanh(), torch.nn.Linear(80, 10)).to(device)


def run(model, opt, steps=4, device="cpu"):
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(8, 100, generator=g).to(device)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize("inner", [torch.optim.AdamW, AdamW8bit], ids=lambda c: c.__name__)
def test_same_as_inner_optimizer(inner):
    a, b = net(), net()
    run(a, inner(a.parameters(), lr=1e-2))
    off = OffloadedOptimizer(b.parameters(), inner, lr=1e-2)
    run(b, off)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert off.state_devices() == {"cpu"}
    assert off.param_groups is off.inner.param_groups  # lr schedulers act on the inner optimizer too


def test_lr_scheduler_works():
    model = net()
    opt = OffloadedOptimizer(model.parameters(), torch.optim.AdamW, lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    run(model, opt, 1)
    sched.step()
    assert opt.inner.param_groups[0]["lr"] == 0.5


def test_bad_optimizer_class():
    with pytest.raises(ValueError, match="optimizer_class="):
        OffloadedOptimizer(net().parameters(), dict)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_state_stays_on_host():
    a, b = net("cuda"), net("cuda")
    run(a, AdamW8bit(a.parameters(), lr=1e-2), device="cuda")
    off = OffloadedOptimizer(b.parameters(), AdamW8bit, lr=1e-2)
    run(b, off, device="cuda")
    assert off.state_devices() == {"cpu"}
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
