"""Atomic writes (slimtune.atomic): whole or nothing, and the permissions a plain write would give.

Oracle for the permissions: what ``open(..., "w")`` / ``os.mkdir`` create under the same umask.
"""

from __future__ import annotations

import os
import stat

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import slimtune
from slimtune.atomic import atomic_file, atomic_folder, current_umask
from slimtune.quant.export import save_pretrained_atomic


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def plain_file_mode(tmp_path) -> int:
    p = tmp_path / "plain.txt"
    p.write_text("x")
    return mode(p)


def test_current_umask_reads_without_changing(umask_027):
    assert current_umask() == 0o027
    assert current_umask() == 0o027


def test_file_gets_a_plain_files_mode_and_a_failure_leaves_the_old_file(tmp_path, umask_027):
    target = tmp_path / "a.bin"
    atomic_file(target, lambda tmp: open(tmp, "wb").write(b"new"))
    assert target.read_bytes() == b"new" and mode(target) == plain_file_mode(tmp_path) == 0o640

    def fail(tmp):
        open(tmp, "wb").write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_file(target, fail)
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "plain.txt"]


def test_folder_gets_a_plain_folders_mode_and_a_failure_leaves_nothing(tmp_path, umask_027):
    (tmp_path / "plain").mkdir()
    out = atomic_folder(tmp_path / "out", lambda tmp: (tmp / "f.txt").write_text("x"))
    assert mode(out) == mode(tmp_path / "plain") == 0o750 and (out / "f.txt").read_text() == "x"

    def fail(tmp):
        (tmp / "f.txt").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_folder(tmp_path / "never", fail)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "plain"]


def test_saved_adapters_and_folders_get_plain_modes(tmp_path):
    """Another account (a server, a teammate) can read a saved adapter: before, its files were 0600 and an
    exported folder 0700 (tempfile's private modes)."""
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    (tmp_path / "plain").mkdir()
    merged = save_pretrained_atomic(model, tmp_path / "merged")
    assert mode(merged) == mode(tmp_path / "plain")
    slimtune.inject(model, slimtune.LoraConfig(r=2, target_modules=("q_proj",)))
    folder = slimtune.save_adapter(model, tmp_path / "adapter")
    want = plain_file_mode(tmp_path)
    assert {p.name: mode(p) for p in folder.iterdir()} == {p.name: want for p in folder.iterdir()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    assert mode(slimtune.save_optimizer(opt, tmp_path / "opt.safetensors")) == want
