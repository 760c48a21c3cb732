"""train_loop: gradient accumulation equals one big batch, clipping, NaN -> TrainingDiverged with the last
checkpoint kept, bf16 autocast really on, fp16 refused on CPU, evaluation, metrics trimming on resume,
and an in-process resume that continues bit-identically."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import slimtune
from slimtune.train.checkpoint import latest_checkpoint, load_checkpoint
from slimtune.train.loop import LoopConfig, TrainingDiverged, train_loop
from slimtune.train.metrics import trim_metrics
from slimtune.train.sampler import EpochSampler
from slimtune.train.schedule import make_scheduler
from tests.conftest import randomize_adapters, tiny_llama
from tests.train._tiny_run import build

DATA = torch.randint(0, 128, (8, 12), generator=torch.Generator().manual_seed(3))


def _lora_model(dropout: float = 0.0):
    model = tiny_llama()
    slimtune.inject(model, slimtune.LoraConfig(r=4, alpha=8, dropout=dropout, target_modules="all-linear"))
    randomize_adapters(model)
    return model


def _batch(indices):
    ids = DATA[indices]
    return {"input_ids": ids, "labels": ids}


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _sgd_run(tmp_path: Path, batch_size: int, grad_accum: int, max_grad_norm=None):
    model = _lora_model()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    sched = make_scheduler(opt, 1, 0, "constant")
    cfg = LoopConfig(max_steps=1, grad_accum=grad_accum, max_grad_norm=max_grad_norm)
    before = _trainable(model)
    train_loop(model, opt, sched, EpochSampler(8, batch_size, seed=0), _batch, cfg, tmp_path)
    after = _trainable(model)
    return {n: before[n] - after[n] for n in before}  # = lr * gradient


def test_two_micro_batches_of_two_equal_one_batch_of_four(tmp_path):
    accum = _sgd_run(tmp_path / "a", batch_size=2, grad_accum=2)
    whole = _sgd_run(tmp_path / "b", batch_size=4, grad_accum=1)
    assert max(float(g.abs().max()) for g in whole.values()) > 1e-3  # the step moved the weights
    worst = max(float((accum[n] - whole[n]).abs().max()) for n in whole)
    assert worst < 1e-6, worst


def test_clipping_bounds_the_trainable_gradient_norm(tmp_path):
    raw = _sgd_run(tmp_path / "a", batch_size=4, grad_accum=1)
    raw_norm = float(torch.cat([g.flatten() for g in raw.values()]).norm())
    assert raw_norm > 1e-2
    clipped = _sgd_run(tmp_path / "b", batch_size=4, grad_accum=1, max_grad_norm=raw_norm / 2)
    total = float(torch.cat([g.flatten() for g in clipped.values()]).norm())
    assert total == pytest.approx(raw_norm / 2, rel=1e-4)
    for n in raw:  # same direction, half the length
        torch.testing.assert_close(clipped[n], raw[n] / 2, rtol=0, atol=1e-6)


def test_nan_loss_raises_naming_the_step_and_keeps_the_last_checkpoint(tmp_path):
    model = _lora_model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = make_scheduler(opt, 10, 0, "constant")
    calls = []

    def batch(indices):
        calls.append(indices)
        out = _batch(indices)
        if len(calls) == 5:  # step 5: every label ignored -> mean over nothing = NaN
            out["labels"] = torch.full_like(out["labels"], -100)
        return out

    cfg = LoopConfig(max_steps=10, save_every=2)
    with pytest.raises(TrainingDiverged, match="step 5") as info:
        train_loop(model, opt, sched, EpochSampler(8, 2, seed=0), batch, cfg, tmp_path)
    assert info.value.step == 5
    last = latest_checkpoint(tmp_path)
    assert last.name == "step-4"
    saved = load_file(str(last / "trainable.safetensors"))
    assert all(torch.equal(saved[n], p) for n, p in _trainable(model).items())  # no update at step 5
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_bf16_runs_under_autocast_with_fp32_adapters(tmp_path):
    model = _lora_model(dropout=0.1)
    base = model.model.layers[0].self_attn.q_proj.base_layer
    seen = []
    base.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = _trainable(model)
    out = train_loop(model, opt, make_scheduler(opt, 3, 0, "constant"), EpochSampler(8, 2, seed=0), _batch,
                     LoopConfig(max_steps=3, precision="bf16"), tmp_path)
    assert seen and set(seen) == {torch.bfloat16}
    assert out["step"] == 3 and out["loss"] == out["loss"]  # finite, not NaN
    after = _trainable(model)
    assert all(t.dtype == torch.float32 for t in after.values())
    assert all(not torch.equal(before[n], after[n]) for n in before)


def test_fp16_on_cpu_is_refused_before_training(tmp_path):
    model = _lora_model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    with pytest.raises(ValueError, match="precision='fp16': needs a CUDA device"):
        train_loop(model, opt, make_scheduler(opt, 2, 0, "constant"), EpochSampler(8, 2, seed=0), _batch,
                   LoopConfig(max_steps=2, precision="fp16"), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("kw, field", [
    ({"max_steps": 0}, "max_steps=0"), ({"grad_accum": 0}, "grad_accum=0"), ({"precision": "fp8"}, "precision='fp8'"),
    ({"save_every": 0}, "save_every=0"), ({"max_grad_norm": -1.0}, "max_grad_norm=-1.0"),
    ({"keep_last": 0}, "keep_last=0"),
])
def test_loop_config_names_bad_values(kw, field):
    with pytest.raises(ValueError, match=field):
        LoopConfig(**{"max_steps": 4, **kw})


def test_evaluate_runs_every_n_steps_in_eval_mode_and_is_logged(tmp_path):
    model = _lora_model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    modes, logged = [], []

    def evaluate():
        modes.append((model.training, torch.is_grad_enabled()))
        return {"eval_loss": 1.5}

    train_loop(model, opt, make_scheduler(opt, 5, 0, "constant"), EpochSampler(8, 2, seed=0), _batch,
               LoopConfig(max_steps=5, eval_every=2, log_every=2), tmp_path, evaluate=evaluate, log=logged.append)
    assert modes == [(False, False)] * 3 and model.training
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == logged
    assert [(x["step"], "eval_loss" in x) for x in lines] == [(2, False), (2, True), (4, False), (4, True),
                                                              (5, False), (5, True)]
    assert set(lines[0]) == {"step", "loss", "lr", "tokens", "tokens_per_s", "elapsed_s", "grad_norm"}
    assert [x["tokens"] for x in lines if "loss" in x] == [48, 96, 120]  # 2 rows x 12 tokens per step


def test_trim_metrics_keeps_steps_up_to_the_resume_point_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 1.0} for s in range(1, 7)] + [{"step": 4, "eval_loss": 2.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 7, "lo')
    trim_metrics(path, 4)
    assert [json.loads(x) for x in path.read_text().splitlines()] == [r for r in rows if r["step"] <= 4]
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="metrics.jsonl: line 2"):
        trim_metrics(path, 4)


def test_resume_in_process_continues_bit_identically(tmp_path):
    cfg = LoopConfig(max_steps=6, save_every=3)
    model, opt, sched, sampler, make_batch = build(6)
    train_loop(model, opt, sched, sampler, make_batch, cfg, tmp_path / "straight")
    straight = _trainable(model)

    model, opt, sched, sampler, make_batch = build(6)
    train_loop(model, opt, sched, sampler, make_batch, LoopConfig(max_steps=3, save_every=3), tmp_path / "resumed")
    model, opt, sched, sampler, make_batch = build(6)  # a fresh process would build everything again
    start = load_checkpoint(latest_checkpoint(tmp_path / "resumed"), model=model, adapter_name="default",
                            optimizer=opt, scheduler=sched, sampler=sampler)["step"]
    train_loop(model, opt, sched, sampler, make_batch, cfg, tmp_path / "resumed", start_step=start)
    resumed = _trainable(model)
    assert all(torch.equal(straight[n], resumed[n]) for n in straight)


def _short_run(tmp_path: Path, precision: str = "fp32", device: str = "cpu") -> tuple[dict, dict, dict]:
    model = _lora_model().to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = _trainable(model)
    out = train_loop(model, opt, make_scheduler(opt, 2, 0, "constant"), EpochSampler(8, 2, seed=0),
                     lambda idx: {k: v.to(device) for k, v in _batch(idx).items()},
                     LoopConfig(max_steps=2, precision=precision), tmp_path)
    return before, _trainable(model), out


def test_progress_bar_is_off_when_stdout_is_not_a_terminal(tmp_path, capsys):
    _short_run(tmp_path / "a")
    assert capsys.readouterr().out == ""


def test_progress_bar_shows_loss_lr_and_tokens_per_second_on_a_terminal(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    _short_run(tmp_path / "a")
    out = capsys.readouterr().out
    assert "loss" in out and "lr" in out and "tok/s" in out and "2/2" in out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 trains on CUDA only")
def test_fp16_on_cuda_trains_with_a_grad_scaler(tmp_path):
    before, after, out = _short_run(tmp_path, precision="fp16", device="cuda")
    assert out["loss"] == out["loss"] and out["step"] == 2
    assert all(t.dtype == torch.float32 for t in after.values())
    assert all(not torch.equal(before[n], after[n]) for n in before)


def _tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_gets_every_metrics_record_as_scalars_when_installed(tmp_path):
    pytest.importorskip("torch.utils.tensorboard")
    model = _lora_model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train_loop(model, opt, make_scheduler(opt, 3, 0, "constant"), EpochSampler(8, 2, seed=0), _batch,
               LoopConfig(max_steps=3, eval_every=2), tmp_path, evaluate=lambda: {"eval_loss": 1.5})
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    scalars = _tensorboard_scalars(tmp_path)
    for tag in ("loss", "lr", "tokens_per_s", "grad_norm"):
        want = [(x["step"], x[tag]) for x in lines if tag in x]
        assert [s for s, _ in scalars[tag]] == [1, 2, 3]
        assert [v for _, v in scalars[tag]] == pytest.approx([v for _, v in want], rel=1e-6)
    assert scalars["eval_loss"] == [(2, 1.5), (3, 1.5)]


def test_without_tensorboard_training_runs_and_writes_no_tensorboard_folder(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import raises ImportError
    _, _, out = _short_run(tmp_path)
    assert out["step"] == 2 and (tmp_path / "metrics.jsonl").is_file()
    assert not (tmp_path / "tensorboard").exists()


def test_tensorboard_drops_the_killed_steps_on_resume(tmp_path):
    pytest.importorskip("torch.utils.tensorboard")
    model, opt, sched, sampler, make_batch = build(6)
    train_loop(model, opt, sched, sampler, make_batch, LoopConfig(max_steps=5, save_every=3), tmp_path)
    model, opt, sched, sampler, make_batch = build(6)
    start = load_checkpoint(tmp_path / "checkpoints" / "step-3", model=model, adapter_name="default",
                            optimizer=opt, scheduler=sched, sampler=sampler)["step"]
    train_loop(model, opt, sched, sampler, make_batch, LoopConfig(max_steps=6, save_every=3), tmp_path,
               start_step=start)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    loss = _tensorboard_scalars(tmp_path)["loss"]
    assert [s for s, _ in loss] == [1, 2, 3, 4, 5, 6]  # steps 4 and 5 of the first run purged, not doubled
    assert [v for _, v in loss] == pytest.approx([x["loss"] for x in lines], rel=1e-6)
