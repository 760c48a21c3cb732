"""``train.batch_size: auto``: the choice from slimtune.memory's estimate, checked against a measured step.

The oracle is ``slimtune.memory.measure.measure_step`` on the model prepared exactly as ``slimtune train``
prepares it (``slimtune.prepare`` with the run's adapter config, dropout included): the chosen configuration's
measured bytes are within the budget and within 10% of the estimate.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

import slimtune
from slimtune.memory.estimate import estimate
from slimtune.memory.measure import measure_step
from slimtune.memory.plan import transient_bytes
from slimtune.memory.spec import Method, Precision, Workload
from slimtune.train.config import RunConfigError, load_run_config, run_config_from_dict
from slimtune.train.distributed import DistributedError, local_processes
from slimtune.train.fit import (CPU_RESERVE_BYTES, NothingFits, UnevenBatch, architecture_of, budget_bytes, choose_fit,
                                divisors, estimator_inputs, resolve_auto, step_bytes)

SEQ = 64


def llama_folder(path, layers=2):
    """A Llama config.json (random weights are built from it): what auto reads before loading anything."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ)
    cfg.save_pretrained(path)
    return path


@pytest.fixture
def tiny_folder(tmp_path):
    return llama_folder(tmp_path / "tiny")


def run_cfg(folder, dropout=0.1, targets="all-linear", **train):
    return run_config_from_dict({
        "model": {"name": str(folder)}, "data": {"max_length": SEQ},
        "adapter": {"method": "lora", "r": 4, "alpha": 8, "dropout": dropout, "target_modules": targets},
        "train": {"batch_size": "auto", "effective_batch": 8, **train}})


def budget_for(cfg, arch, batch, ckpt, slack=1024.0):
    """A budget that just holds ``batch`` rows (with or without checkpointing)."""
    return CPU_RESERVE_BYTES + step_bytes(cfg, arch, batch, ckpt, "cpu") + transient_bytes(arch, batch, SEQ) + slack


@pytest.mark.parametrize("dropout, targets, want_ckpt, layers", [
    (0.1, "all-linear", False, 2), (0.0, "all-linear", False, 2), (0.1, ["q_proj", "v_proj"], False, 2),
    (0.1, "all-linear", True, 12)])
def test_chosen_step_measures_within_budget_and_10_percent(tmp_path, dropout, targets, want_ckpt, layers):
    tiny_folder = llama_folder(tmp_path / "tiny", layers)
    cfg = run_cfg(tiny_folder, dropout, targets)
    arch = architecture_of(str(tiny_folder))
    # 4 rows fit (with checkpointing in the last case: below what 1 row needs without it), 8 do not
    capacity = budget_for(cfg, arch, 4, want_ckpt)
    if want_ckpt:
        assert capacity < budget_for(cfg, arch, 1, False)
    choice = choose_fit(cfg, arch, capacity, "cpu")
    assert (choice.batch, choice.grad_accum, choice.checkpointing) == (4, 2, want_ckpt)

    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_folder))
    slimtune.prepare(model, cfg.adapter)  # as slimtune train does: the run's own config, dropout and all
    measured = measure_step(model, *estimator_inputs(cfg, choice.batch, choice.checkpointing, "cpu"), steps=2,
                            prepared=True)
    assert measured.total + choice.transient + choice.reserve <= capacity
    assert abs(measured.total - choice.estimate) <= 0.10 * choice.estimate, (measured.as_dict(), choice)


def test_accumulation_keeps_the_effective_batch_and_more_memory_never_means_a_smaller_batch(tiny_folder):
    arch = architecture_of(str(tiny_folder))
    for effective in (1, 6, 8, 12):
        cfg = run_cfg(tiny_folder, effective_batch=effective)
        last = 0
        for batch in divisors(effective)[::-1]:
            choice = choose_fit(cfg, arch, budget_for(cfg, arch, batch, False), "cpu")
            assert choice.batch * choice.grad_accum == effective
            assert choice.batch == batch and not choice.checkpointing and choice.batch >= last
            last = choice.batch
    assert divisors(12) == [12, 6, 4, 3, 2, 1]


def test_the_estimate_is_slimtune_memorys_for_the_run(tiny_folder):
    """The mapping run config -> estimator inputs, against hand-written Method/Precision/Workload."""
    cfg = run_cfg(tiny_folder, dropout=0.0, targets=["q_proj", "v_proj"])
    arch = architecture_of(str(tiny_folder))
    want = estimate(arch, Method("lora", rank=4, targets=("q_proj", "v_proj")),
                    Precision("fp32", optimizer="adamw", optim_dtype="fp32"), Workload(2, SEQ, True, "sdpa", "cpu"))
    assert step_bytes(cfg, arch, 2, True, "cpu") == want.total
    # dropout on CPU: one 1-byte (tokens, d_in) mask per adapted linear per block (q and v read the hidden state)
    drop = run_cfg(tiny_folder, dropout=0.1, targets=["q_proj", "v_proj"])
    extra = step_bytes(drop, arch, 2, False, "cpu") - step_bytes(cfg, arch, 2, False, "cpu")
    assert extra == 2 * SEQ * (64 + 64) * 2  # tokens x (d_in q + d_in v) x 2 blocks
    ckpt_extra = step_bytes(drop, arch, 2, True, "cpu") - step_bytes(cfg, arch, 2, True, "cpu")
    assert ckpt_extra == 2 * SEQ * (64 + 64)  # only the block being recomputed holds its masks
    assert step_bytes(drop, arch, 2, False, "cuda") == estimate_for_cuda(arch)


def estimate_for_cuda(arch):
    return estimate(arch, Method("lora", rank=4, targets=("q_proj", "v_proj")),
                    Precision("fp32", optimizer="adamw", optim_dtype="fp32"),
                    Workload(2, SEQ, False, "sdpa", "cuda")).total


def test_user_checkpointing_is_kept(tiny_folder):
    cfg = run_cfg(tiny_folder, grad_checkpointing=True)
    arch = architecture_of(str(tiny_folder))
    choice = choose_fit(cfg, arch, 2**40, "cpu")
    assert (choice.batch, choice.checkpointing) == (8, True)


def test_nothing_fits_says_how_much_more_in_plans_words(tiny_folder):
    cfg = run_cfg(tiny_folder)
    arch = architecture_of(str(tiny_folder))
    capacity = CPU_RESERVE_BYTES  # nothing left for the step itself
    need = budget_for(cfg, arch, 1, True, slack=0.0)
    with pytest.raises(NothingFits) as info:
        choose_fit(cfg, arch, capacity, "cpu", "train.memory=0.27GB")
    msg = str(info.value)
    m = re.fullmatch(r"Nothing fits\. The smallest recipe \(lora fp32 r=4 adamw, batch 1, gradient checkpointing, "
                     r"64 tokens\) needs ([\d.]+) GiB, ([\d.]+) GiB more than you have \(train\.memory=0\.27GB\)\. "
                     r"Use a shorter data\.max_length, .*", msg)
    assert m, msg
    assert float(m.group(1)) == round(need / 2**30, 2)
    assert float(m.group(2)) == round((need - capacity) / 2**30, 2)


def test_resolved_config_has_numbers_and_a_resume_keeps_the_recorded_choice(tiny_folder):
    cfg = load_run_config(None, [f"model.name={tiny_folder}", "data.max_length=64", "train.batch_size=auto",
                                 "train.memory=100GB"])
    fitted, choice = resolve_auto(cfg)
    assert (fitted.train.batch_size, fitted.train.grad_accum, fitted.train.memory) == (8, 1, None)
    assert fitted.effective_batch == cfg.effective_batch == 8
    resumed, choice = resolve_auto(cfg, recorded={"batch_size": 2, "grad_accum": 4, "grad_checkpointing": True})
    assert (resumed.train.batch_size, resumed.train.grad_accum, resumed.train.grad_checkpointing) == (2, 4, True)
    assert "as recorded" in choice.describe()
    plain = load_run_config(None, ["train.batch_size=4"])
    assert resolve_auto(plain) == (plain, None)


@pytest.mark.parametrize("train, message", [
    ({"batch_size": "big"}, "train.batch_size='big': must be a positive integer or auto"),
    ({"batch_size": "auto", "memory": "lots"}, "train.memory='lots': must be a size such as 8GB or 8GiB"),
    ({"batch_size": "auto", "grad_accum": 4}, "train.grad_accum=4: chosen by train.batch_size: auto"),
    ({"batch_size": 4, "effective_batch": 16}, "train.effective_batch=16: only read with train.batch_size: auto"),
    ({"batch_size": 4, "memory": "8GB"}, "train.memory='8GB': only read with train.batch_size: auto"),
])
def test_bad_auto_settings_are_named(train, message):
    with pytest.raises(RunConfigError) as info:
        run_config_from_dict({"train": train})
    assert any(i.startswith(message) for i in info.value.issues), info.value.issues


def test_train_refuses_before_loading_anything(tmp_path):
    """`slimtune train` with a budget too small: exit 2, one error line in plan's words, nothing on disk."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "slimtune", "train", "train.batch_size=auto",
                           "train.memory=0.3GB", f"output_dir={out}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: Nothing fits. The smallest recipe (lora fp32 r=8 adamw")
    assert "more than you have (train.memory=0.3GB)" in lines[0]
    assert not out.exists()


@pytest.mark.slow
def test_default_run_at_2gb_measures_within_budget(tmp_path):
    """The bundled SmolLM2 with the default run's LoRA at a 2 GB budget: the measured step fits and is
    within 10% of the estimate."""
    from slimtune.assets import load_smollm2

    cfg = load_run_config(None, ["train.batch_size=auto", "train.memory=2GB"])
    fitted, choice = resolve_auto(cfg)
    model, _ = load_smollm2()
    slimtune.prepare(model, cfg.adapter)
    measured = measure_step(model, *estimator_inputs(cfg, choice.batch, choice.checkpointing, "cpu"),
                            prepared=True)
    assert measured.total + choice.transient + choice.reserve <= choice.capacity
    assert abs(measured.total - choice.estimate) <= 0.10 * choice.estimate, (measured.as_dict(), choice)


def test_an_architecture_the_estimator_does_not_know_is_a_named_error(tmp_path):
    from slimtune.train.run import RunError, train

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"model_type": "mamba", "hidden_size": 64}')
    cfg = run_config_from_dict({"model": {"name": str(tmp_path / "m")}, "train": {"batch_size": "auto"},
                                "output_dir": str(tmp_path / "run")})
    with pytest.raises(RunError) as info:
        train(cfg, log=lambda line: None)
    assert str(info.value).startswith("train.batch_size='auto': cannot estimate this model's memory: model_type=")
    assert not (tmp_path / "run").exists()


def test_slimtune_train_prints_the_choice_and_records_the_numbers(tmp_path):
    """The user's path: `slimtune train ... train.batch_size=auto` prints the choice and the estimated peak, trains
    with it, and config.yaml records the chosen numbers (what a --resume re-reads)."""
    import json

    import yaml
    from typer.testing import CliRunner

    from slimtune.cli import app
    from tests.sweep.conftest import tiny_model_folder

    folder = tiny_model_folder(tmp_path / "tiny")
    rows = [{"text": f"line {i}: the quick brown fox jumps over the lazy dog"} for i in range(16)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", f"model.name={folder}", f"data.train={tmp_path / 't.jsonl'}",
                                      "data.format=text", "data.max_length=32", "data.packing=false",
                                      "train.max_steps=1", "train.eval_every=null", "train.batch_size=auto",
                                      "train.effective_batch=4", "train.memory=64GB", f"output_dir={out}"])
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if line.startswith("auto-fit:"))
    assert line.startswith("auto-fit: batch_size 4 x grad_accum 1 (effective batch 4), gradient checkpointing off; "
                           "estimated peak ") and "(train.memory=64GB)" in line
    train = yaml.safe_load((out / "config.yaml").read_text())["train"]
    assert (train["batch_size"], train["grad_accum"], train["memory"]) == (4, 1, None)


def test_several_processes_split_the_effective_batch(tiny_folder):
    """Under torchrun each process runs the micro-batch: batch x grad_accum x processes = the effective batch."""
    cfg = run_cfg(tiny_folder)  # effective_batch 8
    arch = architecture_of(str(tiny_folder))
    one = choose_fit(cfg, arch, budget_for(cfg, arch, 2, False), "cpu")
    two = choose_fit(cfg, arch, budget_for(cfg, arch, 2, False), "cpu", processes=2)
    assert (one.batch, one.grad_accum) == (2, 4)
    assert (two.batch, two.grad_accum, two.processes) == (2, 2, 2)
    assert "x 2 processes (effective batch 8)" in two.describe()
    roomy = choose_fit(cfg, arch, 2**40, "cpu", processes=4)
    assert (roomy.batch, roomy.grad_accum) == (2, 1)
    with pytest.raises(UnevenBatch, match=r"train.effective_batch=8: must be a multiple of the 3 processes .* use 6 or 9"):
        choose_fit(cfg, arch, 2**40, "cpu", processes=3)


def test_processes_on_one_machine_share_its_ram(monkeypatch):
    import slimtune.train.fit as fit

    monkeypatch.setattr(fit, "available_bytes", lambda device: 8 * 2**30)
    assert budget_bytes(None, "cpu", 2) == (4 * 2**30, "available RAM 8.0 GiB / 2 processes")
    assert budget_bytes("4GB", "cpu", 2)[0] == budget_bytes("4GB", "cpu", 1)[0]  # train.memory is per process
    assert local_processes({"LOCAL_WORLD_SIZE": "2"}) == 2 and local_processes({}) == 1
    with pytest.raises(DistributedError, match="LOCAL_WORLD_SIZE='two'"):
        local_processes({"LOCAL_WORLD_SIZE": "two"})
