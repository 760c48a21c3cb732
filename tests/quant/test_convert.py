"""Whole-model conversion, layer-by-layer loading from safetensors, and merge for export."""

from __future__ import annotations

import pytest
import torch

import slimtune
from slimtune.quant import Linear4bit, dequantize_model, load_quantized, quantize_model
from slimtune.quant.export import merge_for_export, requantize_error, save_pretrained_atomic


def tokens() -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def test_report_counts_bytes_apart(llama):
    total_other = sum(p.numel() for n, p in llama.named_parameters() if "proj" not in n)
    report = quantize_model(llama, block_size=64, double_quant=False)
    assert report.quantized_params == 2 * (64 * 64 * 2 + 32 * 64 * 2 + 128 * 64 * 3)
    # no double quantization: 4 bits + one float32 per 64 weights, plus the 16 NF4 levels held once
    assert report.quantized_bytes == report.quantized_params // 2 + 4 * report.quantized_params // 64 + 64
    assert report.other_params >= total_other and "lm_head" in report.kept
    assert "bits/param" in str(report)


def test_keep_and_errors(llama):
    with pytest.raises(ValueError, match="keep='q_prj' matches no module.*q_proj"):
        quantize_model(llama, keep=("q_prj",))
    with pytest.raises(ValueError, match="block_size=100"):
        quantize_model(llama, block_size=100)
    with pytest.raises(ValueError, match="compute_dtype="):
        quantize_model(llama, compute_dtype="bf16")
    report = quantize_model(llama, keep=("lm_head", "down_proj"))
    assert isinstance(llama.model.layers[0].mlp.down_proj, torch.nn.Linear)
    assert len(report.quantized) == 12
    with pytest.raises(ValueError, match="no nn.Linear left"):
        quantize_model(llama, keep=("lm_head", "down_proj"))


def test_quantize_after_inject_sees_through_wrappers(llama):
    slimtune.inject(llama, slimtune.LoraConfig(r=4, target_modules="all-linear"))
    report = quantize_model(llama)
    assert "model.layers.0.self_attn.q_proj" in report.quantized
    assert isinstance(llama.model.layers[0].self_attn.q_proj.base_layer, Linear4bit)


@pytest.mark.parametrize("tied", [False, True])
def test_load_quantized_equals_quantize_model(tmp_path, llama, tied):
    from transformers import LlamaForCausalLM

    if tied:
        llama.config.tie_word_embeddings = True
        llama = LlamaForCausalLM(llama.config).eval()
    llama.save_pretrained(tmp_path)
    loaded, report = load_quantized(tmp_path, keep=() if tied else ("lm_head",))
    quantize_model(llama, keep=() if tied else ("lm_head",))
    assert len(report.quantized) == (15 if tied else 14)
    x = tokens()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, llama(x).logits)
    assert not any(p.is_meta for p in loaded.parameters())


def test_load_quantized_reads_a_4bit_checkpoint(tmp_path, llama):
    from safetensors.torch import save_file

    quantize_model(llama)
    llama.save_pretrained(tmp_path)  # the config
    sd = {k: v.contiguous() for k, v in llama.state_dict().items()}  # bitsandbytes layout
    for f in tmp_path.glob("*.safetensors"):
        f.unlink()
    save_file(sd, tmp_path / "model.safetensors")
    loaded, _ = load_quantized(tmp_path)
    x = tokens()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, llama(x).logits)


def test_load_quantized_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_quantized(tmp_path)


def test_merge_for_export_saves_a_plain_hf_model(tmp_path, llama):
    from transformers import AutoModelForCausalLM

    quantize_model(llama)
    slimtune.inject(llama, slimtune.LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for p in llama.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    x = tokens()
    with torch.no_grad():
        ref = llama(x).logits
    plain = merge_for_export(llama, torch.bfloat16)
    out = save_pretrained_atomic(plain, tmp_path / "export")
    with pytest.raises(FileExistsError, match="already exists"):
        save_pretrained_atomic(plain, out)
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    assert back.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits.float(), ref, rtol=0.05, atol=0.05)
    err = requantize_error(back.float())
    assert 0.0 < err.overall < 0.2 and len(err.per_layer) == 14 and "relative weight error" in str(err)


def test_dequantize_model_rejects_bad_dtype(llama):
    quantize_model(llama)
    with pytest.raises(ValueError, match="dtype=torch.int32"):
        dequantize_model(llama, torch.int32)


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("config", [
    slimtune.LoraConfig(r=4, target_modules="all-linear"),
    slimtune.LoraConfig(r=4, target_modules=("q_proj",), modules_to_save=("lm_head",)),
    slimtune.BottleneckConfig(size=8),
], ids=["lora", "modules_to_save", "bottleneck"])
def test_inject_then_quantize_is_quantize_then_inject(config):
    from tests.conftest import randomize_adapters, tiny_llama

    first = tiny_llama()
    slimtune.inject(first, config)
    report = quantize_model(first)
    second = tiny_llama()
    quantize_model(second)
    slimtune.inject(second, config)
    randomize_adapters(second)
    assert sorted(trainable(first)) == sorted(trainable(second))
    with torch.no_grad():
        for name, p in trainable(first).items():
            assert p.dtype == torch.float32  # still a trainable float tensor, not 4-bit codes
            p.copy_(trainable(second)[name])
    types = lambda m: [(n, type(x).__name__) for n, x in m.named_modules()]  # noqa: E731
    assert types(first) == types(second)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(first(x).logits, second(x).logits, rtol=0, atol=0)
    assert not any(".adapters." in n or ".copies." in n for n in report.quantized + report.kept)


def test_layers_left_trainable_by_the_freeze_method_are_not_quantized(llama):
    for p in llama.parameters():
        p.requires_grad_(False)
    llama.model.layers[1].mlp.down_proj.weight.requires_grad_(True)
    report = quantize_model(llama)
    assert isinstance(llama.model.layers[1].mlp.down_proj, torch.nn.Linear)
    assert "model.layers.1.mlp.down_proj" in report.kept and len(report.quantized) == 13


def test_one_set_submodule_and_no_private_imports_across_modules():
    import re
    from pathlib import Path

    src = Path(slimtune.__file__).parent
    files = {p.relative_to(src).as_posix(): p.read_text(encoding="utf-8") for p in src.rglob("*.py")}
    surgery = sorted(f for f, text in files.items() if "setattr(model.get_submodule(" in text
                     or re.search(r"def _?set_submodule|def _replace\(", text))
    assert surgery == ["modules.py"]
    private = re.compile(r"from slimtune[\w.]* import [^\n]*\b_[a-z]\w*|from slimtune[\w.]* import \([^)]*\b_[a-z]\w*")
    mine = ("quant/convert.py", "quant/load.py", "quant/export.py", "quant/linear4bit.py", "methods/prompt.py",
            "control.py", "injection.py", "fingerprint.py")
    assert [f for f in mine if private.search(files[f])] == []
