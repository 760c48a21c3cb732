"""The real SmolLM2-135M (slow): an adapter from `slimtune train`, exported to a HF folder and to GGUF in every
dtype, read back by transformers and compared with PEFT's merge of the same adapter; the GGUF-in round trip.

Run with ``-s`` to see the table of file sizes and logit differences (copied into docs/design/export.md).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
import torch

from slimtune.export import export
from tests.export.conftest import SONNETS, TEXT, read_gguf_model, rounded

pytestmark = pytest.mark.slow
PROMPT = "Shall I compare thee to a summer's day? Thou art more lovely and more temperate:"


def train_run(out: Path, model_name: str = "smollm2-135m") -> Path:
    from slimtune.train.config import load_run_config
    from slimtune.train.run import train

    overrides = [f"model.name={model_name}", f"data.train={SONNETS}", "data.format=text", "data.max_length=64",
                 "data.eval_fraction=0", "train.max_steps=3", "train.batch_size=2", "train.lr=2e-3",
                 "train.eval_every=null", "train.save_every=null", "adapter.r=8", "adapter.alpha=16",
                 "adapter.target_modules=all-linear", f"output_dir={out}"]
    train(load_run_config(None, overrides), log=lambda s: None)
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return train_run(tmp_path_factory.mktemp("real") / "run")


@pytest.fixture(scope="module")
def ids():
    from slimtune.assets import load_smollm2

    return load_smollm2()[1](PROMPT, return_tensors="pt").input_ids


def peft_logits(base_model, adapter: Path, ids: torch.Tensor, round_to: torch.dtype | None = None) -> torch.Tensor:
    from peft import PeftModel

    merged = PeftModel.from_pretrained(base_model, adapter).merge_and_unload().eval()
    if round_to is not None:
        merged = rounded(merged, round_to)
    with torch.no_grad():
        return merged(ids).logits


@pytest.fixture(scope="module")
def oracle(run, ids):
    """PEFT's merge of the run's adapter on the bundled base (float32): its logits, and per 16-bit dtype the
    logits of that merge with its matrices rounded as the file stores them."""
    from slimtune.assets import load_smollm2

    return {d: peft_logits(load_smollm2()[0], run / "adapter", ids, t)
            for d, t in (("f32", None), ("f16", torch.float16), ("bf16", torch.bfloat16))}


def report(name: str, size: int, diff: float) -> None:
    print(f"\n| {name} | {size / 2**20:.1f} MiB | max |logit diff| {diff:.2e} |")


def test_hf_folder(run, ids, oracle, tmp_path):
    from transformers import AutoModelForCausalLM

    result = export(run, tmp_path / "hf", fmt="hf")
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(result.path).eval()(ids).logits
    diff = (got - oracle["f32"]).abs().max().item()
    report("hf f32", result.size_bytes, diff)
    assert diff < 1e-4


# tolerance per dtype against PEFT's merge (documented in docs/design/export.md): f32 1e-4; f16/bf16 1e-3
# against the merge with its matrices rounded the same way; q8_0 / q4_0 (1e-3) against the merge with each matrix
# put through gguf's own quantize -> dequantize in the type the file declares for it (llama.cpp's reference
# NumPy port): the layout, the rotary permutation and the per-tensor type choice are what is tested; how far
# the rounding itself moves the logits (share of the range, next-token agreement) is only reported
TOLERANCE = {"f32": ("f32", 1e-4), "f16": ("f16", 1e-3), "bf16": ("bf16", 1e-3)}


def gguf_rounded_logits(run: Path, ids: torch.Tensor, path: Path) -> torch.Tensor:
    """Logits of PEFT's float32 merge with every weight rounded as the GGUF file ``path`` stores it."""
    from peft import PeftModel

    from slimtune.assets import load_smollm2
    from slimtune.export import llama

    merged = PeftModel.from_pretrained(load_smollm2()[0], run / "adapter").merge_and_unload().eval()
    types = {t.name: gguf.GGMLQuantizationType(t.tensor_type) for t in gguf.GGUFReader(path).tensors}
    with torch.no_grad():
        for hf_name, p in merged.named_parameters():  # a tied lm_head is the embedding's own parameter
            qtype = types.get(llama.gguf_name(hf_name, merged.config))
            if qtype == gguf.GGMLQuantizationType.F16:
                p.copy_(p.half().float())
            elif qtype not in (None, gguf.GGMLQuantizationType.F32):
                w = p.numpy()  # blocks run along each row, as in the file (the rotary permutation moves rows)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)
                                         .reshape(w.shape)))
        return merged(ids).logits


@pytest.mark.parametrize("dtype", ["f16", "q8_0", "f32", "bf16", "q4_0"])
def test_gguf_reads_back_in_transformers(run, ids, oracle, tmp_path, dtype):
    from transformers import AutoTokenizer

    result = export(run, tmp_path / f"smol-{dtype}.gguf", fmt="gguf", dtype=dtype)
    with torch.no_grad():
        got = read_gguf_model(result.path)(ids).logits
    ref, tol = TOLERANCE.get(dtype, (None, 1e-3))
    want = oracle[ref] if ref else gguf_rounded_logits(run, ids, result.path)
    diff = (got - want).abs().max().item()
    exact = oracle["f32"]
    share = (got - exact).abs().max().item() / (exact.max() - exact.min()).item()
    agree = (got.argmax(-1) == exact.argmax(-1)).float().mean().item()
    report(f"gguf {dtype} (vs PEFT merge {ref or 'rounded as the file'}); vs the f32 merge: diff/range "
           f"{share:.3f}, top-1 agreement {agree:.2f}", result.size_bytes, diff)
    assert diff < tol
    if dtype == "f16":  # the next-token choice survives
        assert torch.equal(got[0].argmax(-1), oracle["f32"][0].argmax(-1))
        tok = AutoTokenizer.from_pretrained(result.path.parent, gguf_file=result.path.name)
        from slimtune.assets import load_smollm2

        assert tok(TEXT).input_ids == load_smollm2()[1](TEXT).input_ids
        fields = gguf.GGUFReader(result.path).fields
        assert fields["tokenizer.ggml.pre"].contents() == "smollm"  # copied from the bundled GGUF


def test_lora_gguf_names_and_shapes_match_the_llama_cpp_base(run, tmp_path):
    """Every adapter pair targets a tensor of the bundled GGUF (written by llama.cpp) with matching shapes."""
    from slimtune.assets import SMOLLM2_GGUF, SMOLLM2_PACKAGE, package_dir

    base = {t.name: t.shape.tolist() for t in gguf.GGUFReader(package_dir(SMOLLM2_PACKAGE, "") / SMOLLM2_GGUF).tensors}
    result = export(run, tmp_path / "lora.gguf", fmt="gguf-lora", dtype="f16")
    lora = {t.name: t.shape.tolist() for t in gguf.GGUFReader(result.path).tensors}
    report("gguf-lora f16", result.size_bytes, 0.0)
    assert len(lora) == 2 * 7 * 30
    for name, shape in lora.items():
        target, part = name.rsplit(".", 1)
        ne0, ne1 = base[target]  # (in, out) in GGUF order
        assert shape == ([ne0, 8] if part == "lora_a" else [8, ne1]), name
    text = result.modelfile.read_text()
    assert f"FROM {(package_dir(SMOLLM2_PACKAGE, '') / SMOLLM2_GGUF).resolve()}" in text
    assert "ADAPTER ./lora.gguf" in text


def test_round_trip_gguf_in_train_gguf_out(tmp_path):
    """Train from the bundled .gguf file itself, export GGUF f32, read back: equal to PEFT's merge on the same
    GGUF-loaded base."""
    from slimtune.assets import SMOLLM2_GGUF, SMOLLM2_PACKAGE, package_dir
    from slimtune.train.model import load_model

    source = package_dir(SMOLLM2_PACKAGE, "") / SMOLLM2_GGUF
    run = train_run(tmp_path / "run", str(source))
    result = export(run, tmp_path / "out.gguf", fmt="gguf", dtype="f32")
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 2]])
    with torch.no_grad():
        got = read_gguf_model(result.path)(ids).logits
    want = peft_logits(load_model(str(source), "float32"), run / "adapter", ids)
    diff = (got - want).abs().max().item()
    report("round trip gguf f32", result.size_bytes, diff)
    assert diff < 1e-4
