"""The demo recipe: LoRA (or any method; QLoRA on a 4-bit base) on the real SmolLM2-135M, trained on
Shakespeare on this machine.

It shows the whole loop a user cares about: what LoRA wraps and how many parameters train, the
memory that saves, the loss falling, a generation before and after, and an adapter file of a few
hundred KB that reloads onto a fresh base with identical outputs.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import slimtune
from slimtune.assets import load_smollm2
from slimtune.config import ConfigError, LoraConfig, MethodConfig
from slimtune.data import shakespeare_text, token_blocks

HELD_OUT_PLAY = "romeo-and-juliet"
PROMPT = "ROMEO:\n"


@dataclass(frozen=True)
class DemoResult:
    heldout_before: float
    heldout_after: float
    losses: tuple[float, ...]
    adapter_bytes: int
    reload_max_diff: float


def heldout_loss(model: nn.Module, blocks: torch.Tensor, batch: int = 8) -> float:
    """Mean next-token cross-entropy over ``blocks`` (n, T), in eval mode without grad."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(blocks), batch):
            chunk = blocks[i:i + batch]
            total += model(input_ids=chunk, labels=chunk).loss.item() * len(chunk)
            count += len(chunk)
    model.train(was_training)
    return total / count


def generate(model: nn.Module, tokenizer, prompt: str, new_tokens: int) -> str:
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False, repetition_penalty=1.3,
                             pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0][ids["input_ids"].shape[1]:], skip_special_tokens=True)


def memory_saving(total_params: int, trainable: int, method: str = "lora") -> str:
    """Gradients + AdamW moments in fp32 (4 + 8 bytes per trainable parameter), full vs LoRA."""
    full, lora = 12 * total_params, 12 * trainable
    return (f"gradients + AdamW state (fp32, 12 bytes per trainable param): full fine-tune "
            f"{full / 1e6:,.1f} MB -> {method} {lora / 1e6:,.2f} MB ({full / max(lora, 1):,.0f}x less)")


def default_config(rank: int = 8, alpha: float = 16.0) -> slimtune.LoraConfig:
    return slimtune.LoraConfig(r=rank, alpha=alpha, dropout=0.05, target_modules="all-linear")


class DemoOptionError(ValueError):
    """A demo option that is invalid or conflicts with the config; the message names its CLI flag."""


def demo_config(config: MethodConfig | None = None, rank: int | None = None, alpha: float | None = None,
                qlora: bool = False) -> MethodConfig:
    """The config the demo trains: ``config`` with ``rank``/``alpha`` applied, or LoRA on all linear layers.

    ``rank``/``alpha`` (``--rank``/``--alpha``) set a lora/dora config's r and alpha: the flag wins over
    the file. Other methods have neither, so there they are refused rather than ignored. Raises
    DemoOptionError naming the flag (also for ``qlora`` with freeze/full, see :func:`check_qlora`).
    """
    given = {flag: v for flag, v in (("--rank", rank), ("--alpha", alpha)) if v is not None}
    if config is not None and given and not isinstance(config, LoraConfig):
        flag, value = next(iter(given.items()))
        raise DemoOptionError(f"{flag}={value!r} with method {config.method}: --rank and --alpha set a lora or "
                              f"dora config's r and alpha; {config.method} has neither (set its fields in the "
                              "config file)")
    try:
        if config is None:
            config = default_config(8 if rank is None else rank, 16.0 if alpha is None else alpha)
        elif given:
            config = dataclasses.replace(config, r=config.r if rank is None else rank,
                                         alpha=config.alpha if alpha is None else alpha)
    except ConfigError as exc:
        raise DemoOptionError(f"{' '.join(f'{k}={v!r}' for k, v in given.items())}: {exc}") from None
    check_qlora(config, qlora)
    return config


def run_demo(steps: int = 30, rank: int | None = None, alpha: float | None = None, lr: float = 1e-3,
             batch: int = 8, seq: int = 64, out_dir: str | Path = "runs/demo", seed: int = 0, log=print,
             train_plays: int = 12, heldout_blocks: int = 48, new_tokens: int = 40,
             config: MethodConfig | None = None, qlora: bool = False) -> DemoResult:
    """Train ``config``'s method (default: LoRA r=``rank`` (8) on all linear layers) on the real SmolLM2-135M.

    ``rank``/``alpha`` override a lora/dora config's (see :func:`demo_config`). ``qlora``: load the base
    with its linear layers in NF4 (``slimtune.load_quantized``) and train the adapter on top. Raises
    DemoOptionError (a ValueError), before loading anything, for options that conflict with the config
    (``qlora`` with freeze/full, which train the 4-bit base itself) or an ``out_dir`` that is a file.
    """
    config = demo_config(config, rank, alpha, qlora)
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise DemoOptionError(f"--out={str(out_dir)!r}: is a file; the demo writes an adapter folder inside it")
    torch.manual_seed(seed)
    t0 = time.time()
    model, tokenizer = _load_base(qlora, log)
    log(f"loaded SmolLM2-135M-Instruct{' in NF4' if qlora else ''} in {time.time() - t0:.1f}s")
    train_text = "".join(shakespeare_text(p.stem) for p in _train_plays(train_plays))
    train = token_blocks(tokenizer, train_text, seq)
    heldout = token_blocks(tokenizer, shakespeare_text(HELD_OUT_PLAY), seq, max_blocks=heldout_blocks)
    log(f"data: {len(train):,} training blocks of {seq} tokens; held out: {HELD_OUT_PLAY} ({len(heldout)} blocks)")
    log(f"\nbefore training, {PROMPT.strip()!r} ->\n{generate(model, tokenizer, PROMPT, new_tokens)}\n")

    report = slimtune.prepare(model, config, tokenizer=tokenizer)
    log(str(report))
    log(memory_saving(report.total_params - report.trainable_params, report.trainable_params, report.method) + "\n")

    before = heldout_loss(model, heldout)
    log(f"held-out loss before: {before:.3f} (perplexity {math.exp(before):.1f})")
    losses = _train(model, train, steps, lr, batch, log)
    after = heldout_loss(model, heldout)
    log(f"held-out loss after {steps} steps: {after:.3f} (perplexity {math.exp(after):.1f})")
    log(f"\nafter training, {PROMPT.strip()!r} ->\n{generate(model, tokenizer, PROMPT, new_tokens)}\n")

    if config.method in ("freeze", "full"):
        log(f"{config.method} tuning changes the model itself: save it with model.save_pretrained(...)")
        return DemoResult(before, after, tuple(losses), 0, 0.0)
    folder = slimtune.save_adapter(model, Path(out_dir) / "adapter", base_model_name_or_path="SmolLM2-135M-Instruct")
    size = sum(f.stat().st_size for f in folder.iterdir())
    diff = _reload_check(model, folder, heldout[:2], qlora)
    log(f"saved adapter to {folder} ({size / 1e6:.2f} MB); reloaded onto a fresh base: max logit diff {diff:.2e}")
    return DemoResult(before, after, tuple(losses), size, diff)


def _train_plays(n: int) -> list[Path]:
    from slimtune.data import play_files
    return [p for p in play_files() if p.stem != HELD_OUT_PLAY][:n]


def _train(model: nn.Module, blocks: torch.Tensor, steps: int, lr: float, batch: int, log) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    t0 = time.time()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(blocks), (batch,))
        chunk = blocks[idx]  # (batch, seq)
        loss = model(input_ids=chunk, labels=chunk).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step == 1 or step % 5 == 0 or step == steps:
            log(f"  step {step:>4}/{steps}  loss {loss.item():.3f}  ({(time.time() - t0) / step:.2f}s/step)")
    model.eval()
    return losses


def check_qlora(config: MethodConfig | None, qlora: bool) -> None:
    """Raise DemoOptionError when ``qlora`` is asked with a method that trains the (then 4-bit) base."""
    if qlora and config is not None and config.method in ("freeze", "full"):
        raise DemoOptionError(f"--qlora with method {config.method}: {config.method} tuning trains the base "
                              "weights, which are 4-bit and frozen under QLoRA; use lora, dora, bottleneck or prompt")


def _load_base(qlora: bool, log) -> tuple[nn.Module, object]:
    if not qlora:
        return load_smollm2()
    from transformers import AutoTokenizer

    from slimtune.assets import smollm2_path

    model, report = slimtune.load_quantized(smollm2_path())
    log(str(report))
    return model.eval(), AutoTokenizer.from_pretrained(smollm2_path())


def _reload_check(model: nn.Module, folder: Path, sample: torch.Tensor, qlora: bool = False) -> float:
    fresh, _ = _load_base(qlora, lambda _: None)
    slimtune.load_adapter(fresh, folder)
    with torch.no_grad():
        return (fresh(input_ids=sample).logits - model(input_ids=sample).logits).abs().max().item()
