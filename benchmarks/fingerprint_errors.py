"""Measured relative rounding error of each storage format, per layer: the figures behind fingerprint.BOUNDS.

For every linear layer (and the input embedding) of SmolLM2-135M and of tiny random Llama / GPT-2 models it
prints min / median / max over layers of ||w_copy - w|| / ||w|| for bf16, fp16 and NF4 copies, both exact
(whole weight) and as the fingerprint's 16-value sketch estimates it, and the same for another random seed.
Run: PYTHONPATH=src python benchmarks/fingerprint_errors.py  (docs/fingerprint.md quotes its output)
"""

from __future__ import annotations

import copy
import statistics

import torch
from torch import nn

from slimtune import fingerprint as fp
from slimtune.quant import quantize_model


def layers(model: nn.Module) -> dict[str, nn.Module]:
    emb = model.get_input_embeddings()
    return {n: m for n, m in model.named_modules()
            if (isinstance(m, nn.Linear) or m is emb or type(m).__name__ in ("Conv1D", "Linear4bit"))
            and "lm_head" not in n}


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for n, m in layers(model).items():
        w, _ = fp.dense_weight(m)
        out[n] = w.detach().float()
    return out


def errors(ref: nn.Module, other: nn.Module) -> tuple[list[float], list[float]]:
    a, b = weights(ref), weights(other)
    fa = fp.compute(ref, layers(ref).items())
    fb = fp.compute(other, layers(other).items())
    exact = [float((b[n] - a[n]).norm() / a[n].norm()) for n in a]
    sketched = [fp.relative_difference(fa.sketches[n], fb.sketches[n]) for n in a]
    return exact, sketched


def row(label: str, exact: list[float], sketched: list[float]) -> None:
    f = lambda v: f"{min(v):.3g} / {statistics.median(v):.3g} / {max(v):.3g}"  # noqa: E731
    print(f"  {label:<22} exact {f(exact):<28} sketch {f(sketched)}")


def report(name: str, build) -> None:
    base = build(0)
    print(f"{name}: {len(layers(base))} layers (min / median / max over layers)")
    for label, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        row(label, *errors(base, copy.deepcopy(base).to(dtype)))
    for bs, dq in ((64, True), (64, False), (256, True), (4096, True)):
        if not any(isinstance(m, nn.Linear) for n, m in layers(base).items()):
            break  # GPT-2's Conv1D layers are not quantized
        q = copy.deepcopy(base)
        quantize_model(q, keep=("lm_head",), block_size=bs, double_quant=dq)
        exact, sketched = errors(base, q)
        quantized = [i for i, e in enumerate(exact) if e > 0]  # the embedding stays in float32
        row(f"nf4 block {bs}{' dq' if dq else ''}", [exact[i] for i in quantized], [sketched[i] for i in quantized])
    other = build(1)
    if other is not None:
        row("another seed", *errors(base, other))


def smollm2(seed: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    from slimtune.assets import smollm2_path

    if seed == 0:
        return AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32).eval()
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(smollm2_path())).eval()


def tiny(kind: str):
    def build(seed: int):
        from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        if kind == "llama":
            return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                                num_hidden_layers=2, num_attention_heads=4,
                                                num_key_value_heads=2)).eval()
        return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)).eval()
    return build


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    report("tiny Llama (hidden 64)", tiny("llama"))
    report("tiny GPT-2 (hidden 64)", tiny("gpt2"))
    report("SmolLM2-135M-Instruct", smollm2)
