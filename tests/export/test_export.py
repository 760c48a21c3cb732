"""`export` end to end on tiny models: the HF folder and GGUF against PEFT's merge, bad input, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import slimtune
from slimtune.cli import app
from slimtune.export import ExportError, export
from tests.export.conftest import (
    load_base, logits, peft_merged, read_gguf_model, sample_ids, save_base,
)


def test_hf_folder_loads_in_plain_transformers_equal_to_peft(base_dir, adapter_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = export(adapter_dir, tmp_path / "hf", base=str(base_dir), fmt="hf")
    back = AutoModelForCausalLM.from_pretrained(result.path).eval()
    ids = sample_ids()
    torch.testing.assert_close(logits(back, ids), logits(peft_merged(base_dir, adapter_dir), ids), atol=1e-5, rtol=0)
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {
        f.name for f in result.path.iterdir()}
    assert AutoTokenizer.from_pretrained(result.path)("Paris").input_ids == \
        AutoTokenizer.from_pretrained(base_dir)("Paris").input_ids
    assert not any(n.startswith("base_layer") or "lora" in n for n in back.state_dict())


def test_hf_f16(base_dir, adapter_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    result = export(adapter_dir, tmp_path / "hf16", base=str(base_dir), fmt="hf", dtype="f16")
    back = AutoModelForCausalLM.from_pretrained(result.path)
    assert back.dtype == torch.float16
    want = peft_merged(base_dir, adapter_dir).state_dict()
    for name, t in back.state_dict().items():
        assert torch.equal(t, want[name].half()), name


def test_gguf_equals_peft_merge_and_writes_a_modelfile(base_dir, adapter_dir, tmp_path):
    result = export(adapter_dir, tmp_path / "m.gguf", base=str(base_dir), fmt="gguf", dtype="f32")
    ids = sample_ids()
    torch.testing.assert_close(logits(read_gguf_model(result.path), ids),
                               logits(peft_merged(base_dir, adapter_dir), ids), atol=1e-4, rtol=0)
    text = result.modelfile.read_text()
    assert result.modelfile.name == "m.Modelfile"
    assert "FROM ./m.gguf" in text and 'PARAMETER stop "<|im_end|>"' in text and "<|im_start|>" in text
    assert result.size_bytes == result.path.stat().st_size


def test_adapter_for_another_base_is_refused(base_dir, adapter_dir, tmp_path, tiny_tokenizer):
    other = save_base(tmp_path / "other", tiny_tokenizer, seed=5)  # same shapes, other weights
    with pytest.raises(slimtune.BaseModelMismatch, match="adapter_model.safetensors"):
        export(adapter_dir, tmp_path / "m.gguf", base=str(other))
    wider = save_base(tmp_path / "deeper", tiny_tokenizer, layers=3)  # other shapes
    with pytest.raises(slimtune.AdapterFileError, match="does not fit"):
        export(adapter_dir, tmp_path / "m.gguf", base=str(wider))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deeper", "other"]


def test_unsupported_architecture_is_refused_for_gguf_only(tmp_path, tiny_tokenizer):
    from tests.conftest import tiny_gpt2

    base = tmp_path / "gpt2"
    tiny_gpt2().save_pretrained(base)
    tiny_tokenizer.save_pretrained(base)
    model = tiny_gpt2()
    slimtune.inject(model, slimtune.LoraConfig(r=2, target_modules=("c_attn",)))
    adapter = slimtune.save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base))
    with pytest.raises(ExportError, match=r"architecture \('GPT2LMHeadModel',\).*--format hf"):
        export(adapter, tmp_path / "g.gguf", fmt="gguf")
    assert not (tmp_path / "g.gguf").exists()
    assert (export(adapter, tmp_path / "g-hf", fmt="hf").path / "config.json").is_file()


@pytest.mark.parametrize("fmt, dtype, message", [
    ("hf", "q8_0", r"--dtype='q8_0': a Hugging Face folder holds f32, f16, bf16"),
    ("gguf", "q4_k_m", r"--dtype='q4_k_m': the gguf package cannot quantize K-quants"),
    ("gguf", "fp16", r"--dtype='fp16': a GGUF export holds one of f32, f16, bf16, q8_0, q4_0"),
    ("onnx", "f32", r"--format='onnx': must be one of hf, gguf, gguf-lora"),
])
def test_dtype_or_format_it_cannot_hold(base_dir, adapter_dir, tmp_path, fmt, dtype, message):
    with pytest.raises(ExportError, match=message):
        export(adapter_dir, tmp_path / "out", base=str(base_dir), fmt=fmt, dtype=dtype)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt, name", [("gguf", "m.gguf"), ("hf", "hf")])
def test_existing_output_refused_unless_overwrite(base_dir, adapter_dir, tmp_path, fmt, name):
    out = tmp_path / name
    out.mkdir() if fmt == "hf" else out.write_text("keep me")
    with pytest.raises(ExportError, match=rf"-o '{out}': already exists.*--overwrite"):
        export(adapter_dir, out, base=str(base_dir), fmt=fmt)
    assert out.exists()
    export(adapter_dir, out, base=str(base_dir), fmt=fmt, overwrite=True)
    assert (out / "config.json").is_file() if fmt == "hf" else out.read_bytes()[:4] == b"GGUF"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left behind


def test_gguf_over_a_folder_is_refused(base_dir, adapter_dir, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(ExportError, match=r"-o '.*out': is a folder; a GGUF export writes one file"):
        export(adapter_dir, tmp_path / "out", base=str(base_dir), overwrite=True)
    assert (tmp_path / "out").is_dir()


def test_missing_source_and_base(tmp_path, adapter_dir):
    with pytest.raises(ExportError, match=r"SOURCE='.*nothing': no such folder"):
        export(tmp_path / "nothing", tmp_path / "m.gguf")
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in adapter_dir.iterdir():
        (bare / f.name).write_bytes(f.read_bytes())
    (bare / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": None}))
    with pytest.raises(ExportError, match=r"--base: required"):
        export(bare, tmp_path / "m.gguf")


def test_cli_exports_and_refuses_with_exit_2(base_dir, adapter_dir, tmp_path):
    runner = CliRunner()
    out = tmp_path / "c.gguf"
    ok = runner.invoke(app, ["export", str(adapter_dir), "--base", str(base_dir), "-o", str(out), "--dtype", "q8_0"])
    assert ok.exit_code == 0, ok.output
    assert f"wrote {out} (gguf, q8_0" in ok.output and "ollama create" in ok.output
    again = runner.invoke(app, ["export", str(adapter_dir), "--base", str(base_dir), "-o", str(out)])
    assert again.exit_code == 2
    lines = [line for line in again.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: -o ") and "--overwrite" in lines[0]
    bad = runner.invoke(app, ["export", str(adapter_dir), "--base", str(tmp_path / "nope"), "-o", str(tmp_path / "x")])
    assert bad.exit_code == 2 and f"error: --base='{tmp_path / 'nope'}': must be" in bad.output


def test_a_model_folder_exports_as_is(base_dir, tmp_path):
    """A freeze/full run writes model/ (a plain folder): exported without a base; no adapter to export alone."""
    result = export(base_dir, tmp_path / "m.gguf", fmt="gguf", dtype="f32")
    ids = sample_ids()
    torch.testing.assert_close(logits(read_gguf_model(result.path), ids), logits(load_base(base_dir), ids),
                               atol=1e-4, rtol=0)
    with pytest.raises(ExportError, match=r"is a whole model.*--format gguf"):
        export(base_dir, tmp_path / "l.gguf", fmt="gguf-lora")
