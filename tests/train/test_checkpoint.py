"""Checkpoints: full round trip (adapter, optimizer, scheduler, sampler, RNGs), atomicity (temp and unmarked
folders ignored and cleaned up), keep_last pruning, and corrupted files -> CheckpointError naming the file,
with model, optimizer, scheduler, sampler and RNGs untouched."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import slimtune
from slimtune.files import adapter_tensors, read_folder
from slimtune.optim import AdamW8bit, OffloadedOptimizer
from slimtune.train import checkpoint as ckpt_mod
from slimtune.train.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from slimtune.train.sampler import EpochSampler
from slimtune.train.schedule import make_scheduler
from tests.conftest import randomize_adapters, tiny_llama, tokens

OPTIMIZERS = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2),
    "adamw8bit": lambda ps: AdamW8bit(ps, lr=1e-2, min_8bit_size=200),  # some tensors 8-bit, some fp32
    "offload": lambda ps: OffloadedOptimizer(ps, torch.optim.AdamW, lr=1e-2),
}


def _parts(kind: str = "adamw", r: int = 4, seed: int = 1, steps: int = 2):
    """Tiny Llama + LoRA, an optimizer with state after ``steps`` updates, its scheduler and sampler."""
    model = tiny_llama()
    slimtune.inject(model, slimtune.LoraConfig(r=r, alpha=8, target_modules="all-linear"))
    randomize_adapters(model, seed=seed)
    opt = OPTIMIZERS[kind]([p for p in model.parameters() if p.requires_grad])
    sched = make_scheduler(opt, total=10, warmup=2, kind="cosine")
    sampler = EpochSampler(12, 3, seed=0)
    model.train()
    for i in range(steps):
        ids = tokens(seed=seed * 10 + i)
        sampler.next_batch()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt, sched, sampler


def _save(run_dir, step, parts, **kw):
    model, opt, sched, sampler = parts
    return save_checkpoint(run_dir, step, model=model, adapter_name="default", optimizer=opt, scheduler=sched,
                           sampler=sampler, **kw)


def _load(path, parts):
    model, opt, sched, sampler = parts
    return load_checkpoint(path, model=model, adapter_name="default", optimizer=opt, scheduler=sched, sampler=sampler)


def _snapshot(parts) -> dict:
    model, opt, sched, sampler = parts
    sd = opt.state_dict()
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
            "opt": {(i, k): v.clone() if torch.is_tensor(v) else v
                    for i, st in sd["state"].items() for k, v in st.items()},
            "groups": json.dumps(sd["param_groups"]), "sched": sched.state_dict(), "sampler": sampler.state(),
            "torch": torch.get_rng_state(), "python": random.getstate(), "numpy_state": np.random.get_state(),
            "numpy": np.random.get_state()[1].copy()}


def _assert_same(a: dict, b: dict) -> None:
    assert a["params"].keys() == b["params"].keys()
    assert all(torch.equal(a["params"][n], b["params"][n]) for n in a["params"])
    assert a["opt"].keys() == b["opt"].keys()
    for k, v in a["opt"].items():
        w = b["opt"][k]
        assert (torch.equal(v, w) and v.dtype == w.dtype) if torch.is_tensor(v) else v == w, k
    assert a["groups"] == b["groups"] and a["sched"] == b["sched"] and a["sampler"] == b["sampler"]
    assert torch.equal(a["torch"], b["torch"]) and a["python"] == b["python"] and (a["numpy"] == b["numpy"]).all()


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_round_trip_restores_everything_and_training_continues_identically(tmp_path, kind):
    src = _parts(kind)
    torch.manual_seed(7)
    random.seed(7)
    np.random.seed(7)
    path = _save(tmp_path, 2, src, extra={"tokens": 96})
    saved = _snapshot(src)
    nxt = (torch.rand(3), random.random(), np.random.rand(2))
    dst = _parts(kind, seed=2, steps=1)  # other weights, other optimizer state, other position
    assert _load(path, dst) == {"step": 2, "tokens": 96}
    assert torch.equal(torch.rand(3), nxt[0]) and random.random() == nxt[1] and (np.random.rand(2) == nxt[2]).all()
    torch.set_rng_state(saved["torch"])
    random.setstate(saved["python"])
    np.random.set_state(saved["numpy_state"])
    _assert_same(saved, _snapshot(dst))
    for model, opt, *_ in (src, dst):  # one more update from the same state gives the same weights
        ids = tokens(seed=99)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(_snapshot(src)["params"].values(), _snapshot(dst)["params"].values()))


def test_checkpoint_holds_a_usable_peft_adapter_folder(tmp_path):
    parts = _parts()
    path = _save(tmp_path, 3, parts)
    folder = read_folder(path / "adapter")
    live = adapter_tensors(parts[0])
    assert sorted(folder.tensors) == sorted(live)
    assert all(torch.equal(folder.tensors[k], live[k]) for k in live)


def test_temp_and_unmarked_folders_are_ignored_and_removed_at_the_next_save(tmp_path):
    parts = _parts()
    step4 = _save(tmp_path, 4, parts)
    root = tmp_path / "checkpoints"
    shutil.copytree(step4, root / "step-8")
    (root / "step-8" / "complete").unlink()  # renamed but the marker never written
    shutil.copytree(step4, root / ".step-12.tmp-abc")  # killed before the rename (even with a marker inside)
    assert latest_checkpoint(tmp_path) == step4
    with pytest.raises(CheckpointError, match="step-8.*marker"):
        _load(root / "step-8", parts)
    _save(tmp_path, 5, parts)
    assert sorted(p.name for p in root.iterdir()) == ["step-4", "step-5"]
    assert latest_checkpoint(tmp_path) == root / "step-5"
    assert latest_checkpoint(tmp_path / "nothing-here") is None


@pytest.mark.parametrize("keep_last, left", [(1, [5]), (2, [4, 5]), (3, [3, 4, 5])])
def test_keep_last_prunes_older_complete_checkpoints(tmp_path, keep_last, left):
    parts = _parts(steps=1)
    for step in range(1, 6):
        _save(tmp_path, step, parts, keep_last=keep_last)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [f"step-{s}" for s in left]


def test_failed_save_prunes_nothing_and_leaves_no_temp(tmp_path, monkeypatch):
    parts = _parts(steps=1)
    for step in (1, 2):
        _save(tmp_path, step, parts, keep_last=2)

    def disk_full(*a, **k):
        raise OSError("No space left on device")

    monkeypatch.setattr(ckpt_mod, "save_optimizer", disk_full)
    with pytest.raises(OSError, match="No space"):
        _save(tmp_path, 3, parts, keep_last=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-1", "step-2"]
    assert latest_checkpoint(tmp_path).name == "step-2"


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _edit_json(name: str, change):
    def edit(folder: Path) -> None:
        d = json.loads((folder / name).read_text())
        change(d)
        (folder / name).write_text(json.dumps(d))
    return edit


CORRUPTIONS = {
    "trainable truncated": (lambda f: _truncate(f / "trainable.safetensors"), "trainable.safetensors"),
    "trainable missing": (lambda f: (f / "trainable.safetensors").unlink(), "trainable.safetensors.*missing"),
    "optimizer truncated": (lambda f: _truncate(f / "optimizer.safetensors"), "optimizer.safetensors"),
    "scheduler not json": (lambda f: (f / "scheduler.json").write_text("{oops"), "scheduler.json.*JSON"),
    "sampler other data": (_edit_json("sampler.json", lambda d: d.update(n=999)), "sampler.json.*n=999"),
    "rng python short": (_edit_json("rng.json", lambda d: d["python"][1].pop()), "rng.json.*python"),
    "rng numpy bad pos": (_edit_json("rng.json", lambda d: d["numpy"].__setitem__(2, 700)), "rng.json.*numpy"),
    "rng torch missing": (lambda f: (f / "rng.safetensors").unlink(), "rng.safetensors"),
    "state wrong step": (_edit_json("state.json", lambda d: d.update(step=7)), "state.json.*step=7"),
    "marker missing": (lambda f: (f / "complete").unlink(), "marker"),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corrupted_checkpoint_raises_named_error_and_touches_nothing(tmp_path, name):
    corrupt, pattern = CORRUPTIONS[name]
    path = _save(tmp_path, 2, _parts())
    corrupt(path)
    dst = _parts(seed=2, steps=1)
    before = _snapshot(dst)
    with pytest.raises(CheckpointError, match=pattern):
        _load(path, dst)
    _assert_same(before, _snapshot(dst))


def test_other_rank_and_other_optimizer_groups_are_refused_untouched(tmp_path):
    path = _save(tmp_path, 2, _parts(r=4))
    dst = _parts(r=8, steps=1)
    before = _snapshot(dst)
    shapes = (r"trainable\.safetensors: tensor '.*lora_[AB].*' is torch.float32 \((4, \d+|\d+, 4)\); "
              r"the model's is torch.float32 \((8, \d+|\d+, 8)\)")
    with pytest.raises(CheckpointError, match=shapes):
        _load(path, dst)
    _assert_same(before, _snapshot(dst))
    model, _, _, sampler = dst = _parts(r=4, steps=0)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    others = [p for n, p in model.named_parameters() if p.requires_grad and "lora_B" not in n]
    opt = torch.optim.AdamW([{"params": others}, {"params": lora_b, "lr": 0.1}])  # LoRA+-style groups
    dst = (model, opt, make_scheduler(opt, 10, 2, "cosine"), sampler)
    before = _snapshot(dst)
    with pytest.raises(CheckpointError, match="optimizer.safetensors.*groups"):
        _load(path, dst)
    _assert_same(before, _snapshot(dst))


def test_save_leaves_every_rng_at_the_saved_state_even_if_something_inside_draws(tmp_path, monkeypatch):
    real = ckpt_mod.save_optimizer

    def drawing(opt, path):
        torch.rand(1), random.random(), np.random.rand()
        return real(opt, path)

    monkeypatch.setattr(ckpt_mod, "save_optimizer", drawing)
    parts = _parts(steps=1)
    before = _snapshot(parts)
    path = _save(tmp_path, 1, parts)
    _assert_same(before, _snapshot(parts))  # the live run goes on from the state in the checkpoint
    assert torch.equal(load_file(str(path / "rng.safetensors"))["torch"], before["torch"])


def test_extra_must_be_json(tmp_path):
    with pytest.raises(ValueError, match="extra="):
        _save(tmp_path, 1, _parts(steps=0), extra={"t": torch.zeros(1)})
    assert latest_checkpoint(tmp_path) is None


def test_train_package_never_unpickles():
    src = Path(ckpt_mod.__file__).parent
    text = "\n".join(p.read_text() for p in src.rglob("*.py"))
    for call in ("torch.load(", "import pickle", "pickle.load", "weights_only"):
        assert call not in text, call


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA generators exist only with CUDA")
def test_cuda_rng_round_trip(tmp_path):
    parts = _parts(steps=1)
    torch.cuda.manual_seed_all(5)
    path = _save(tmp_path, 1, parts)
    want = torch.rand(3, device="cuda")
    torch.cuda.manual_seed_all(6)
    _load(path, parts)
    assert torch.equal(torch.rand(3, device="cuda"), want)
