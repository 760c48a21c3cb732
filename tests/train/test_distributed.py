"""Many processes on torch.distributed (gloo on CPU), each test a real ``torchrun`` of 2 processes in a
subprocess on the tiny random Llama (seconds each):

- 2 processes with grad_accum 1 train the same adapter, with the same per-step loss, gradient norm and token
  count, as 1 process with grad_accum 2 (the oracle: the single-process loop, itself checked against one big
  batch in test_accumulation.py); the ranks' rows hold different trained-token counts, so a per-rank loss
  normalisation or a missing x world_size (DDP averages) would show in the gradient norm;
- FSDP2 (``fully_shard`` of the frozen base, adapter under DDP) gives the same adapter as DDP;
- FSDP2 on a 4-bit (NF4) base likewise, each rank holding half of the frozen values;
- rank 0 alone writes metrics and checkpoints, which hold every rank's RNG state; a SIGKILL of both workers
  and torchrun, twice, then a resume, ends bit-identical to an uninterrupted 2-process run (dropout on, so each
  rank's RNG state matters); a checkpoint of 2 processes is refused by 1;
- a bad config under torchrun stops both ranks with the error before any process group is joined (no hang);
  ``slimtune train --nproc`` checks the config before it starts torchrun, and runs the real CLI end to end.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import slimtune
from slimtune.train.checkpoint import latest_checkpoint, load_checkpoint
from slimtune.train.checkpoint_read import CheckpointError
from slimtune.train.distributed import DistributedError, World, torchrun_command, world_from_env
from slimtune.train.sampler import EpochSampler
from slimtune.train.schedule import make_scheduler
from tests.conftest import tiny_llama
from tests.train import _ddp_run

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 180  # seconds: a hang (a rank waiting for a dead one) fails the test instead of blocking the suite


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return env


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    """Run ``cmd``; past TIMEOUT (a hang), SIGTERM it (torchrun passes it on to its workers) and fail."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, err = proc.communicate(timeout=60)
        pytest.fail(f"{' '.join(cmd[-6:])}: still running after {TIMEOUT} s (a hang?): {err[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _tiny(run_dir: Path, *flags: str, nproc: int = 2, steps: int = 8) -> subprocess.CompletedProcess:
    script = ["-m", "tests.train._ddp_run", str(run_dir), "--steps", str(steps), *flags]
    done = _run(_torchrun(*script) if nproc == 2 else [sys.executable, *script])
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _final(run_dir: Path, rank: int = 0) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / f"final.rank{rank}.safetensors"))


@pytest.fixture(scope="module")
def two_procs(tmp_path_factory) -> Path:
    """An 8-step run of 2 gloo processes, grad_accum 1, checkpoints at 4 and 8."""
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    _tiny(run_dir)
    return run_dir


def test_two_processes_train_as_one_process_with_twice_the_accumulation(two_procs, tmp_path):
    one = tmp_path / "one"
    _tiny(one, "--grad-accum", "2", nproc=1)
    want, got = _final(one), _final(two_procs)
    assert sorted(want) == sorted(got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    for name, t in _final(two_procs, rank=1).items():  # the ranks hold the same adapter
        assert torch.equal(t, got[name]), name
    for w, g in zip(_metrics(one), _metrics(two_procs), strict=True):
        assert w["step"] == g["step"] and w["tokens"] == g["tokens"]  # tokens of both ranks are counted
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-5)
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-5)  # the scale of the all-reduced gradient


def test_rank_0_alone_writes_and_checkpoints_hold_every_ranks_rng(two_procs):
    steps = [r["step"] for r in _metrics(two_procs)]
    assert steps == list(range(1, 9))  # one line per step: rank 1 wrote nothing
    ckpt = latest_checkpoint(two_procs)
    assert ckpt.name == "step-8" and sorted(p.name for p in (two_procs / "checkpoints").iterdir()) == [
        "step-4", "step-8"]
    assert json.loads((ckpt / "state.json").read_text())["world_size"] == 2
    for name in ("rng.safetensors", "rng.json", "rng.rank1.safetensors", "rng.rank1.json"):
        assert (ckpt / name).is_file(), name
    assert not (ckpt / "rng.rank2.json").exists()


def test_a_checkpoint_of_two_processes_is_refused_by_one(two_procs):
    model = tiny_llama()
    slimtune.inject(model, slimtune.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = make_scheduler(opt, total=8, warmup=2, kind="cosine")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(CheckpointError, match=r"world_size=2.*written by 2 processes, this run has 1.*--nproc 2"):
        load_checkpoint(latest_checkpoint(two_procs), model=model, adapter_name="default", optimizer=opt,
                        scheduler=sched, sampler=EpochSampler(_ddp_run.ROWS, _ddp_run.BATCH, seed=3),
                        world=World())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)


def _assert_half_of_the_base_per_rank(stdout: str) -> None:
    """Rank 0's report ``frozen values on this rank: H of N``: FSDP2 holds about half of the base per rank."""
    line = next(x for x in stdout.splitlines() if x.startswith("frozen values on this rank"))
    here, full = (int(w) for w in line.split(":")[1].split(" of "))
    assert 0.45 * full <= here <= 0.55 * full, line


def test_fsdp2_sharded_frozen_base_trains_the_same_adapter_as_ddp(two_procs, tmp_path):
    sharded = tmp_path / "fsdp"
    _assert_half_of_the_base_per_rank(_tiny(sharded, "--fsdp").stdout)
    want = _final(two_procs)
    for name, t in _final(sharded).items():
        torch.testing.assert_close(t, want[name], rtol=1e-5, atol=1e-6, msg=name)
    for w, g in zip(_metrics(two_procs), _metrics(sharded), strict=True):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-5)
    # the adapter a checkpoint holds records the same base-model fingerprint as an unsharded run's
    assert _fingerprint(latest_checkpoint(sharded)) == _fingerprint(latest_checkpoint(two_procs))


def _fingerprint(ckpt: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(ckpt / "adapter" / "adapter_model.safetensors"), "pt") as f:
        return f.metadata()["slimtune_fingerprint"]


def test_fsdp2_shards_a_4bit_base_and_trains_the_same_adapter_as_ddp(tmp_path):
    ddp, sharded = tmp_path / "ddp", tmp_path / "fsdp"
    _tiny(ddp, "--nf4", steps=4)
    _assert_half_of_the_base_per_rank(_tiny(sharded, "--nf4", "--fsdp", steps=4).stdout)
    want = _final(ddp)
    for name, t in _final(sharded).items():
        torch.testing.assert_close(t, want[name], rtol=1e-5, atol=1e-6, msg=name)


def _kill_all_after_step(run_dir: Path, step: int, *flags: str) -> None:
    """Start a 2-process run (resuming from run_dir's checkpoints) and SIGKILL both workers and torchrun as soon
    as rank 0 reports ``step`` (torchrun starts each worker in its own session: they are killed by pid)."""
    cmd = _torchrun("-m", "tests.train._ddp_run", str(run_dir), "--steps", "12", "--step-sleep", "0.5", *flags)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    workers: list[int] = []
    try:
        for line in proc.stdout:  # two ranks share the pipe: a line may hold pieces of both, so search in it
            workers += [int(pid) for pid in re.findall(r"pid (\d+)", line)]
            if re.search(rf"(?<![\w-])step {step}(?!\d)", line):
                break
        else:
            pytest.fail(f"the run ended (rc {proc.wait()}) before step {step}")
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert len(workers) == 2
    deadline = time.monotonic() + 30
    while not all(_dead(pid) for pid in workers):  # nothing of the killed run may write after this
        assert time.monotonic() < deadline, f"workers {workers} still alive"
        time.sleep(0.05)


def _dead(pid: int) -> bool:
    """Gone, or a zombie (killed, not yet reaped: it runs no more code)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def test_kill9_of_both_processes_then_resume_is_bit_identical(tmp_path):
    flags = ("--dropout", "0.1", "--save-every", "3")  # dropout: each rank's own RNG state must be resumed
    ref, run = tmp_path / "ref", tmp_path / "run"
    _tiny(ref, *flags, steps=12)
    _kill_all_after_step(run, 4, *flags)  # after the checkpoint of step 3
    first = latest_checkpoint(run)
    _kill_all_after_step(run, int(first.name.split("-")[1]) + 2, *flags)  # resumed, killed again
    assert not (run / "final.rank0.safetensors").exists(), "a killed run got to the end before its kill"
    _tiny(run, *flags, steps=12)
    for rank in (0, 1):
        want, got = _final(ref, rank), _final(run, rank)
        changed = [n for n in want if not torch.equal(want[n], got[n])]
        assert not changed, f"rank {rank}: {changed[:3]} differ from the uninterrupted run"
    assert [r["step"] for r in _metrics(run)] == list(range(1, 13))
    assert [r["loss"] for r in _metrics(run)] == [r["loss"] for r in _metrics(ref)]


def test_a_nan_loss_on_one_rank_stops_both_at_the_same_step_before_the_update(tmp_path):
    run_dir = tmp_path / "run"
    done = _run(_torchrun("-m", "tests.train._ddp_run", str(run_dir), "--steps", "12", "--save-every", "1",
                          "--nan-row", "7"))  # row 7: on one rank's micro-batch of some step
    assert done.returncode != 0
    steps = re.findall(r"training diverged: loss is nan at step (\d+)", done.stderr)
    assert len(steps) == 2 and steps[0] == steps[1], done.stderr[-3000:]  # both ranks, the same step
    step = int(steps[0])
    assert [r["step"] for r in _metrics(run_dir)] == list(range(1, step))
    assert latest_checkpoint(run_dir).name == f"step-{step - 1}"  # nothing of the NaN step was saved


def test_a_bad_config_under_torchrun_stops_every_rank_without_joining(tmp_path):
    out = tmp_path / "run"
    done = _run(_torchrun("-m", "slimtune", "train", "train.lr=-1", f"output_dir={out}"))
    assert done.returncode != 0
    # both ranks stop in the config check, before joining the group
    assert done.stderr.count("train.lr=-1: must be a positive number") == 2, done.stderr[-2000:]
    assert "init_process_group" not in done.stderr and not out.exists()


def test_nproc_checks_the_config_before_starting_torchrun(tmp_path):
    done = _run([sys.executable, "-m", "slimtune", "train", "--nproc", "2", "train.lr=-1", f"output_dir={tmp_path}"])
    assert done.returncode == 2 and done.stderr.startswith("error: ") and "train.lr=-1" in done.stderr, done.stderr
    assert "torch.distributed" not in done.stderr  # no torchrun was started


def test_torchrun_command_and_its_errors(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    cmd = torchrun_command(4, ["train", "cfg.yaml", "train.lr=1e-4", "--resume"], python="py")
    assert cmd == ["py", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4", "-m", "slimtune",
                   "train", "cfg.yaml", "train.lr=1e-4", "--resume"]
    with pytest.raises(DistributedError, match=r"--nproc=0: must be an integer >= 1"):
        torchrun_command(0, ["train"])
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(DistributedError, match="already runs under torchrun"):
        torchrun_command(2, ["train"])


def test_world_from_env_reads_torchrun_variables_and_names_bad_ones():
    assert world_from_env({}) == World()
    w = world_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (w.rank, w.world_size, w.local_rank, w.is_main, w.distributed) == (3, 4, 1, False, True)
    with pytest.raises(DistributedError, match="RANK, WORLD_SIZE set but LOCAL_RANK not"):
        world_from_env({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(DistributedError, match="WORLD_SIZE='two': must be an integer"):
        world_from_env({"RANK": "0", "WORLD_SIZE": "two", "LOCAL_RANK": "0"})
    with pytest.raises(DistributedError, match="rank=2: must be below world_size=2"):
        world_from_env({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})


def test_each_rank_takes_its_contiguous_share_of_the_global_batch():
    drawn = [[0, 1], [2, 3], [4, 5], [6, 7]]  # grad_accum 2 x 2 ranks
    assert World(0, 2).share(drawn) == [[0, 1], [2, 3]] and World(1, 2).share(drawn) == [[4, 5], [6, 7]]
    assert World().share(drawn) == drawn
    with pytest.raises(DistributedError, match="3 micro-batches cannot be split evenly over 2 ranks"):
        World(0, 2).share(drawn[:3])


CHAT = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}? Answer with a number."},
                      {"role": "assistant", "content": str(a + b)}]} for a in range(2, 9) for b in range(3, 7)]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """A tiny random Llama saved as a Hugging Face folder with SmolLM2's tokenizer (chat template included)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from slimtune.assets import smollm2_path

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    folder = tmp_path_factory.mktemp("tiny") / "model"
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _cli(*args: str) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "slimtune", "train", *args])


@pytest.mark.slow
def test_slimtune_train_nproc_2_equals_one_process_with_grad_accum_2_and_resumes(tiny_folder, tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in CHAT))
    common = [f"model.name={tiny_folder}", f"data.train={data}", "data.format=chat", "data.eval_fraction=0.25",
              "data.max_length=64", "data.packing=false", "adapter.dropout=0", "train.max_steps=3",
              "train.batch_size=2", "train.save_every=2", "train.eval_every=null", "train.lr=1e-2"]
    two, one = tmp_path / "two", tmp_path / "one"
    done = _cli("--nproc", "2", *common, f"output_dir={two}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("processes: 2 (gloo); effective batch 4 (batch_size 2 x grad_accum 1 x 2 processes)") == 1
    assert done.stdout.count("trained 3 steps") == 1, done.stdout  # rank 0 alone prints
    single = _cli(*common, "train.grad_accum=2", f"output_dir={one}")
    assert single.returncode == 0, single.stderr[-3000:]

    want = load_file(str(one / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(two / "adapter" / "adapter_model.safetensors"))
    assert sorted(want) == sorted(got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
    lines = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3] and lines[-1]["event"] == "summary"

    refused = _cli(*common, "--resume", f"output_dir={two}")  # one process cannot resume two processes' run
    assert refused.returncode == 2 and "written by 2 processes, this run has 1" in refused.stderr
    resumed = _cli("--nproc", "2", *common, "--resume", f"output_dir={two}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "(step 3)" in resumed.stdout


def test_fsdp_needs_an_adapter_method_and_several_processes(tmp_path, monkeypatch):
    from slimtune.train.config import RunConfigError, load_run_config
    from slimtune.train.run import RunError, train

    with pytest.raises(RunConfigError, match=r"train.fsdp=True: .*adapter.method='full'"):
        load_run_config(None, ["train.fsdp=true", "adapter.method=full"])
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    cfg = load_run_config(None, ["train.fsdp=true", f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(RunError, match=r"train.fsdp=True: .* this is one; run `slimtune train --nproc N`"):
        train(cfg, log=lambda line: None)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_slimtune_train_nproc_2_with_batch_size_auto_splits_the_effective_batch(tiny_folder, tmp_path):
    """Auto-fit through the CLI under torchrun: each of the 2 processes gets half the effective batch, the choice
    is printed once (rank 0) and recorded, and the run trains."""
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in CHAT))
    done = _cli("--nproc", "2", f"model.name={tiny_folder}", f"data.train={data}", "data.format=chat",
                "data.eval_fraction=0", "data.max_length=64", "train.max_steps=2", "train.batch_size=auto",
                "train.effective_batch=8", "train.memory=2GB", "train.eval_every=null", "train.save_every=null",
                f"output_dir={tmp_path / 'run'}")
    assert done.returncode == 0, done.stderr[-3000:]
    fit = [line for line in done.stdout.splitlines() if line.startswith("auto-fit:")]
    assert len(fit) == 1 and "x 2 processes (effective batch 8)" in fit[0], done.stdout
    assert "train.memory=2GB" in fit[0]
    assert done.stdout.count("effective batch 8 (batch_size 4 x grad_accum 1 x 2 processes)") == 1, done.stdout
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]
    assert (saved["batch_size"], saved["grad_accum"]) == (4, 1)
    assert done.stdout.count("trained 2 steps") == 1
