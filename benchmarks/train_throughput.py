"""Training throughput: `slimtune train`'s loop vs a plain transformers Trainer + PEFT script (and TRL's SFTTrainer).

The same work for every configuration: the bundled SmolLM2-135M-Instruct in fp32 on CPU, LoRA r=8 alpha=16 on
every linear layer (dropout 0.05), AdamW lr 1e-3 (constant, no weight decay, clipping at 1.0), batch 4, the same
seed and thread count, `--warmup` untimed steps then `--steps` timed ones. The data are the bundled BBC News chat
rows (`slimtune train`'s default task: an article -> its topic in one word) with the articles cut in turn to
15/30/60/120/240 words (`--words`), so lengths vary as in real chat data (71-461 tokens, median 135, every one
shorter than max_length 512): the case packing is for. `--words 90` is the default task's uniform cut (151-237
tokens), where a padded batch wastes little and greedy packing saves nothing. The rows are encoded once by
slimtune's chat encoder and handed to every configuration as the same token ids and labels (-100 on the prompt),
so only the training machinery differs:

  slimtune, packing   `slimtune.train.loop.train_loop` with the run's data pipeline (`pack` + `collate`,
                      `EpochSampler`): `slimtune train`'s default data handling (several examples per row)
  slimtune, padding   the same loop, `packing: false`: one example per row, padded to the batch's longest
  Trainer + PEFT      `transformers.Trainer` + `peft.get_peft_model`, `DataCollatorForSeq2Seq` (pads): the
                      peer's default data handling, on exactly the batches of "slimtune, padding"
  Trainer + PEFT, packed rows   the same Trainer on slimtune's packed rows and collate: same work as row 1
  TRL SFTTrainer      `trl.SFTTrainer` (its default: padding, no packing) with `peft_config`, the same batches,
                      in its own venv (benchmarks/.venv-trl, made here; "not installed (why)" when that fails)

Checkpoints, evaluation and logging are off in all (slimtune: save_every/eval_every None, its only end-of-run
checkpoint falls after the timed window, and its one metrics.jsonl line per step is what times the
steps; Trainer: save_strategy "no", report_to [], logging_steps huge,
disable_tqdm). Each configuration runs in its own fresh process (peak RSS = that process's VmHWM), in
alternating order over `--rounds` rounds; figures are medians over rounds.

Real tokens = tokens of the examples (no padding); padded tokens = the rows' positions as fed to the model
(batch x longest row, summed over the timed steps); padding waste = (padded - real) / padded. Tokens/s counts
real tokens over the timed steps' wall time. Results: benchmarks/results/train_throughput.md.

    python benchmarks/train_throughput.py [--rounds 3] [--budget-s 840] [--steps 4] [--warmup 1] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "train_throughput.md"
TRL_VENV = HERE / ".venv-trl"
RANK, ALPHA, DROPOUT, LR, MAX_GRAD_NORM, SEED, POOL = 8, 16, 0.05, 1e-3, 1.0, 0, 400
CONFIGS = {  # name -> (label, data handling)
    "slimtune-packed": ("slimtune train, packing (its default)", "packed"),
    "slimtune-padded": ("slimtune train, padding", "padded"),
    "trainer-padded": ("Trainer + PEFT, padding (its default)", "padded"),
    "trainer-packed": ("Trainer + PEFT on slimtune's packed rows", "packed"),
    "trl-padded": ("TRL SFTTrainer + PEFT, padding (its default)", "padded"),
}


# ---------------------------------------------------------------- the work, prepared once by the parent

def prepare_work(args: argparse.Namespace, path: Path) -> dict:
    """Encode the examples with slimtune's pipeline and fix the padded batches' order; written to ``path``."""
    from slimtune.assets import smollm2_path
    from slimtune.train.data import bbc_topic_rows, examples_from_rows, pack
    from slimtune.train.model import load_tokenizer
    from slimtune.train.sampler import EpochSampler

    tok = load_tokenizer("smollm2-135m")
    cuts = [bbc_topic_rows("train", seed=SEED, words=w)[:POOL] for w in args.words]
    rows = [cuts[i % len(cuts)][i] for i in range(POOL)]  # row i: an article cut to words[i % len(words)] words
    examples, _, _ = examples_from_rows(rows, "chat", tok, args.max_length, file="<bundled BBC News topics>")
    sampler = EpochSampler(len(examples), args.batch, SEED)
    order = [sampler.next_batch() for _ in range(args.warmup + args.steps)]
    rows = pack(examples, args.max_length)
    fill = sum(len(e.input_ids) for e in examples) / (len(rows) * args.max_length)
    work = {"model": str(smollm2_path()), "pad_id": tok.pad_token_id, "batch": args.batch, "words": args.words,
            "per_row": len(examples) / len(rows), "fill": fill,
            "max_length": args.max_length, "warmup": args.warmup, "steps": args.steps, "threads": args.threads,
            "examples": [[e.input_ids, e.labels] for e in examples], "order": order}
    path.write_text(json.dumps(work))
    return work


def padded_counts(lengths: list[list[int]]) -> tuple[int, int]:
    """(real, padded) tokens of batches given as lists of row lengths (rows padded to the longest)."""
    return sum(map(sum, lengths)), sum(len(b) * max(b) for b in lengths)


# ---------------------------------------------------------------- workers (one fresh process each)

def slimtune_worker(work: dict, packed: bool) -> dict:
    """`slimtune train`'s loop on the run's data pipeline; returns timings and token counts."""
    import torch

    import slimtune
    from slimtune.train.data import Example, collate, pack
    from slimtune.train.loop import LoopConfig, train_loop
    from slimtune.train.model import load_model
    from slimtune.train.sampler import EpochSampler
    from slimtune.train.schedule import make_scheduler

    examples = [Example(ids, labels) for ids, labels in work["examples"]]
    rows = pack(examples, work["max_length"]) if packed else examples
    total = work["warmup"] + work["steps"]
    torch.manual_seed(SEED)
    model = load_model(work["model"], "float32")
    model.config.use_cache = False  # as run.py: a KV cache would switch off the packed block-diagonal mask
    slimtune.prepare(model, slimtune.LoraConfig(r=RANK, alpha=ALPHA, dropout=DROPOUT, target_modules="all-linear"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    sched = make_scheduler(opt, total, 0, "constant")
    sampler = EpochSampler(len(rows), work["batch"], SEED)
    lengths: list[list[int]] = []
    stamps: list[float] = []

    def make_batch(indices: list[int]) -> dict:
        if not packed and len(lengths) < total:
            assert indices == work["order"][len(lengths)], "slimtune's sampler must give the peer's batches"
        picked = [rows[i] for i in indices]
        lengths.append([sum(len(e.input_ids) for e in r) for r in picked] if packed
                       else [len(e.input_ids) for e in picked])
        return collate(picked, work["pad_id"], packed)

    with tempfile.TemporaryDirectory() as run_dir:
        cfg = LoopConfig(max_steps=total, max_grad_norm=MAX_GRAD_NORM, log_every=1)
        train_loop(model, opt, sched, sampler, make_batch, cfg, run_dir,
                   log=lambda record: stamps.append(time.perf_counter()) if "tokens_per_s" in record else None)
    return timed(stamps, lengths, work)


def timed(stamps: list[float], lengths: list[list[int]], work: dict) -> dict:
    """Figures of the timed steps: ``stamps[k]`` = end of step k+1, ``lengths[k]`` = step k+1's row lengths."""
    w, s = work["warmup"], work["steps"]
    real, padded = padded_counts(lengths[w:w + s])
    return {"seconds": stamps[w + s - 1] - stamps[w - 1], "real": real, "padded": padded}


def trainer_args(work: dict, out: str, cls=None, **extra):
    """TrainingArguments (or ``cls``, e.g. SFTConfig) for the same work, every overhead switched off."""
    from transformers import TrainingArguments

    return (cls or TrainingArguments)(
        output_dir=out, per_device_train_batch_size=work["batch"], max_steps=work["warmup"] + work["steps"],
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=MAX_GRAD_NORM, optim="adamw_torch", seed=SEED, save_strategy="no", eval_strategy="no",
        report_to=[], logging_steps=10**6, disable_tqdm=True, use_cpu=True, dataloader_num_workers=0,
        dataloader_pin_memory=False, remove_unused_columns=False, train_sampling_strategy="sequential", **extra)


def stamp_callback(stamps: list[float]):
    """A TrainerCallback appending the time at each optimizer step's end to ``stamps``."""
    from transformers import TrainerCallback

    class Stamps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    return Stamps()


def counting(collator, lengths: list[list[int]]):
    """``collator`` that also records each batch's real row lengths (attention mask / position-id blocks)."""
    def collate(features):
        batch = collator(features)
        if "attention_mask" in batch:
            lengths.append(batch["attention_mask"].sum(dim=1).tolist())
        else:  # slimtune's packed rows (no attention mask): the lengths of the examples packed in each row
            lengths.append([sum(len(ids) for ids in f["parts"]) for f in features])
        return batch
    return collate


def peft_model(work: dict):
    """The base model wrapped by ``peft.get_peft_model`` (the plain Trainer + PEFT script's model)."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(work["model"], dtype=torch.float32)
    model.config.use_cache = False
    return peft.get_peft_model(model, lora_config())


def lora_config():
    import peft

    return peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules="all-linear",
                           task_type="CAUSAL_LM")


def ordered_features(work: dict) -> list[dict]:
    """The padded configurations' examples, flattened in the order of slimtune's sampler (the Trainer reads them
    sequentially, so its batches are exactly slimtune's)."""
    ex = work["examples"]
    return [{"input_ids": ex[i][0], "labels": ex[i][1], "attention_mask": [1] * len(ex[i][0])}
            for batch in work["order"] for i in batch]


def packed_features(work: dict) -> list[dict]:
    """slimtune's packed rows in its sampler's order, each with its parts (for the Trainer's packed run)."""
    from slimtune.train.data import Example, pack
    from slimtune.train.sampler import EpochSampler

    rows = pack([Example(i, l) for i, l in work["examples"]], work["max_length"])
    sampler = EpochSampler(len(rows), work["batch"], SEED)
    order = [i for _ in range(work["warmup"] + work["steps"]) for i in sampler.next_batch()]
    return [{"parts": [e.input_ids for e in rows[i]], "row": rows[i]} for i in order]


def trainer_worker(work: dict, packed: bool) -> dict:
    """A plain transformers Trainer + PEFT script on the same batches."""
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer

    tok = AutoTokenizer.from_pretrained(work["model"])
    tok.pad_token_id = work["pad_id"]
    if packed:
        from slimtune.train.data import collate

        features = packed_features(work)
        collator = lambda fs: collate([f["row"] for f in fs], work["pad_id"], True)  # noqa: E731
    else:
        features = ordered_features(work)
        collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    lengths: list[list[int]] = []
    stamps: list[float] = []
    model = peft_model(work)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model=model, args=trainer_args(work, out), train_dataset=features,
                          data_collator=counting(collator, lengths), callbacks=[stamp_callback(stamps)])
        trainer.train()
    return timed(stamps, lengths, work)


def trl_worker(work: dict) -> dict:
    """TRL's SFTTrainer (default data handling: padding) with PEFT on the same pre-tokenized batches."""
    import datasets
    import torch
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(work["model"])
    tok.pad_token_id = work["pad_id"]
    feats = ordered_features(work)  # completion_mask: TRL's way to train the assistant tokens only
    data = datasets.Dataset.from_dict({"input_ids": [f["input_ids"] for f in feats],
                                       "completion_mask": [[int(x != -100) for x in f["labels"]] for f in feats]})
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(work["model"], dtype=torch.float32)
    model.config.use_cache = False
    lengths: list[list[int]] = []
    stamps: list[float] = []
    with tempfile.TemporaryDirectory() as out:
        args = trainer_args(work, out, trl.SFTConfig, max_length=work["max_length"], packing=False,
                            completion_only_loss=True)
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                                 peft_config=lora_config(), callbacks=[stamp_callback(stamps)])
        trainer.data_collator = counting(trainer.data_collator, lengths)
        trainer.train()
    return timed(stamps, lengths, work)


def worker(name: str, work_path: Path) -> None:
    """One configuration in this fresh process; prints its figures and peak RSS as one JSON line."""
    import importlib
    import importlib.util

    import torch
    from _common import own_peak_rss

    work = json.loads(work_path.read_text())
    torch.set_num_threads(work["threads"])
    if name.startswith("slimtune"):
        result = slimtune_worker(work, name.endswith("packed"))
    elif name.startswith("trainer"):
        result = trainer_worker(work, name.endswith("packed"))
    else:
        result = trl_worker(work)
    versions = {m: importlib.import_module(m).__version__ for m in ("transformers", "peft", "trl")
                if importlib.util.find_spec(m)}
    print(json.dumps({**result, "peak_rss": own_peak_rss(), "versions": versions}))


# ---------------------------------------------------------------- the parent: TRL's venv, rounds, report

def trl_python(install: bool, budget_s: float = 300.0) -> tuple[str | None, str]:
    """(python of benchmarks/.venv-trl, "") when TRL imports there, else (None, why). With ``install``, makes
    the venv first (torch pinned to this process's version, then trl and peft as TRL pins them), within
    ``budget_s`` seconds."""
    import torch

    python = TRL_VENV / "bin" / "python"
    check = [str(python), "-c", "import trl, peft, datasets"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return str(python), ""
    if not install:
        return None, "no benchmarks/.venv-trl (run without --no-trl-install to make it)"
    deadline = time.monotonic() + budget_s
    steps = [[sys.executable, "-m", "venv", str(TRL_VENV)],
             [str(python), "-m", "pip", "install", "-q", f"torch=={torch.__version__.split('+')[0]}"],
             [str(python), "-m", "pip", "install", "-q", "trl", "peft"]]
    for cmd in steps:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return None, f"`{' '.join(cmd[-3:])}` took more than {budget_s:.0f} s"
        if done.returncode != 0:
            return None, f"`{' '.join(cmd[-3:])}` failed: {done.stderr.strip().splitlines()[-1:]}"
    ok = subprocess.run(check, capture_output=True, text=True)
    return (str(python), "") if ok.returncode == 0 else (None, f"import failed: {ok.stderr.strip()[-200:]}")


def run_config(name: str, python: str, work_path: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [python, str(Path(__file__).resolve()), "--worker", name, "--work", str(work_path)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "wall": time.perf_counter() - t0}


def check_same_work(name: str, got: dict, work: dict) -> None:
    """The padded configurations must have trained exactly the batches slimtune's sampler chose."""
    if CONFIGS[name][1] != "padded":
        return
    ex, w, s = work["examples"], work["warmup"], work["steps"]
    want = padded_counts([[len(ex[i][0]) for i in b] for b in work["order"][w:w + s]])
    if (got["real"], got["padded"]) != want:
        raise RuntimeError(f"{name}: trained (real, padded) = {(got['real'], got['padded'])} tokens, "
                           f"expected {want}: not the same batches")


def measure(names: list[str], pythons: dict[str, str], work: dict, work_path: Path, rounds: int,
            budget_s: float) -> dict:
    """Up to ``rounds`` rounds, alternating the order; a new round starts only if it should end within
    ``budget_s`` of the start (judged by the longest round so far)."""
    runs: dict[str, list[dict]] = {n: [] for n in names}
    start, longest = time.monotonic(), 0.0
    for r in range(rounds):
        if r and time.monotonic() - start + longest > budget_s:
            print(f"stopping after {r} round(s): another would pass --budget-s {budget_s:.0f}", flush=True)
            break
        t0 = time.monotonic()
        for name in (names if r % 2 == 0 else names[::-1]):
            got = run_config(name, pythons[name], work_path)
            check_same_work(name, got, work)
            runs[name].append(got)
            print(f"round {r + 1} {name}: {got['real'] / got['seconds']:.0f} real tokens/s, "
                  f"peak RSS {got['peak_rss'] / 1e6:.0f} MB, process {got['wall']:.0f} s", flush=True)
        longest = max(longest, time.monotonic() - t0)
    return runs


def summarize(runs: list[dict], steps: int) -> dict:
    return {"tps": statistics.median(g["real"] / g["seconds"] for g in runs),
            "step_s": statistics.median(g["seconds"] / steps for g in runs),
            "real": runs[0]["real"], "padded": runs[0]["padded"],
            "rss": statistics.median(g["peak_rss"] for g in runs), "versions": runs[0]["versions"]}


def ratio(a: dict | None, b: dict | None) -> str:
    return f"{a['tps'] / b['tps']:.2f}x" if a and b else "-"


def report(stats: dict[str, dict], work: dict, rounds: int, trl_note: str) -> str:
    from _common import machine

    peer = stats.get("trainer-padded")
    lines = [
        "# Training throughput: `slimtune train` vs transformers Trainer + PEFT (and TRL SFTTrainer)", "",
        f"SmolLM2-135M-Instruct fp32 on CPU, LoRA r={RANK} alpha={ALPHA} all-linear dropout {DROPOUT}, AdamW lr "
        f"{LR:g} constant, clip {MAX_GRAD_NORM}, batch {work['batch']}, max_length {work['max_length']}, "
        f"{work['threads']} threads, seed {SEED}. Data: {len(work['examples'])} bundled BBC News chat rows "
        f"(`slimtune train`'s default task: article -> topic), the articles cut in turn to "
        f"{'/'.join(map(str, work['words']))} words, encoded once by slimtune ("
        f"{min(len(e[0]) for e in work['examples'])}-{max(len(e[0]) for e in work['examples'])} tokens each), "
        "the same token ids and labels for every configuration; the padded ones train exactly the same batches. "
        f"{work['warmup']} warm-up step(s), then {work['steps']} timed steps; each configuration in its own fresh "
        f"process, {rounds} round(s) in alternating order, medians. Real tokens = the examples' tokens (no "
        "padding); padded tokens = positions fed to the model over the timed steps; padding waste = pad / padded.",
        "", f"Machine: {machine('transformers', 'peft')}.", "",
        "| configuration | real tokens/s | real / padded tokens | padding waste | step s | peak RSS MB | "
        "vs Trainer+PEFT, same data handling | vs Trainer+PEFT, its default (padding) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in stats.items():
        same = stats.get("trainer-packed") if CONFIGS[name][1] == "packed" else peer
        same_s = "1.00x" if s is same else ratio(s, same)
        lines.append(f"| {CONFIGS[name][0]} | {s['tps']:,.0f} | {s['real']:,} / {s['padded']:,} | "
                     f"{1 - s['real'] / s['padded']:.1%} | {s['step_s']:.2f} | {s['rss'] / 1e6:,.0f} | {same_s} | "
                     f"{ratio(s, peer)} |")
    lines += ["", f"TRL: {trl_note}.", "", *notes(stats, work), ""]
    return "\n".join(lines)


def notes(stats: dict[str, dict], work: dict) -> list[str]:
    """The target verdicts and what the packing figures mean, from the measured numbers."""
    out = []
    peer, own = stats.get("trainer-padded"), stats.get("slimtune-padded")
    pairs = [("slimtune-packed", "trainer-padded", "its default data handling (packing) vs the peer's (padding)"),
             ("slimtune-padded", "trainer-padded", "the same padded batches"),
             ("slimtune-packed", "trainer-packed", "the same packed rows")]
    for a, b, what in pairs:
        if a in stats and b in stats:
            r = stats[a]["tps"] / stats[b]["tps"]
            out.append(f"- Target (issue 11) >= 1.10x Trainer+PEFT's real tokens/s, {what}: {r:.2f}x, "
                       f"{'met' if r >= 1.1 else 'NOT met'}.")
    packed = stats.get("slimtune-packed")
    out.append(f"- Packing: slimtune's greedy, order-preserving `pack` fits {work['per_row']:.2f} examples in a "
               f"{work['max_length']}-token row on average ({work['fill']:.0%} full), and a batch is padded to "
               "its longest row.")
    if packed and own:
        waste = [1 - x["real"] / x["padded"] for x in (packed, own)]
        verdict = ("saves padding" if waste[0] < waste[1] else
                   "buys no padding saving here: with examples of similar length a padded batch of single "
                   "examples wastes little; a best-fit packer would fill rows better (docs/design/train.md)")
        out.append(f"  Padding waste {waste[0]:.1%} packed vs {waste[1]:.1%} padded: packing {verdict}.")
    if peer and own:
        out.append("- 'step s' is per optimizer step; packed rows carry about "
                   f"{stats.get('slimtune-packed', own)['padded'] / own['padded']:.1f}x the positions of padded "
                   "batches, so compare tokens/s, not step times, across data handling. Peak RSS grows with the "
                   "positions per batch (logits are batch x positions x 49,152 floats).")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=840.0, help="no new round past this (seconds)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--words", type=lambda v: [int(w) for w in v.split(",")], default=[15, 30, 60, 120, 240],
                    help="article cuts in words, used in turn (varied lengths: where packing matters); "
                         "90 = slimtune train's default task (151-237 tokens, similar lengths)")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--configs", default="slimtune-packed,slimtune-padded,trainer-padded,trainer-packed,trl-padded")
    ap.add_argument("--no-trl-install", action="store_true", help="use benchmarks/.venv-trl only if it exists")
    ap.add_argument("--out", type=Path, default=RESULTS, help="the results file (markdown)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 2 steps, 1 warm-up, 1 round, no results file")
    ap.add_argument("--worker", choices=tuple(CONFIGS))
    ap.add_argument("--work", type=Path)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.work)
        return
    if args.quick:
        args.steps, args.warmup, args.rounds = 2, 1, 1
    names = [n for n in args.configs.split(",") if n]
    pythons = {n: sys.executable for n in names}
    trl_note = "not asked for (--configs)"
    if "trl-padded" in names:
        python, why = trl_python(install=not args.no_trl_install)
        if python is None:
            names.remove("trl-padded")
            trl_note = f"not installed ({why})"
        else:
            pythons["trl-padded"] = python
    with tempfile.TemporaryDirectory() as tmp:
        work_path = Path(tmp) / "work.json"
        work = prepare_work(args, work_path)
        runs = measure(names, pythons, work, work_path, args.rounds, args.budget_s)
    stats = {n: summarize(runs[n], args.steps) for n in names}
    if "trl-padded" in stats:
        v = stats["trl-padded"]["versions"]
        trl_note = f"trl {v.get('trl')} with transformers {v.get('transformers')}, peft {v.get('peft')} in benchmarks/.venv-trl"
    text = report(stats, work, len(next(iter(runs.values()))), trl_note)
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp_file = args.out.with_suffix(".md.tmp")
        tmp_file.write_text(text)
        os.replace(tmp_file, args.out)
    print(text)


if __name__ == "__main__":
    main()
