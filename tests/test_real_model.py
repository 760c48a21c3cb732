"""End to end on the real SmolLM2-135M (slow: tens of seconds on a 2-core CPU)."""

import pytest
import torch

import slimtune
from slimtune.assets import load_smollm2
from slimtune.demo import run_demo

pytestmark = pytest.mark.slow


def test_demo_trains_saves_and_reloads(tmp_path):
    lines = []
    result = run_demo(steps=8, batch=4, seq=64, lr=2e-3, out_dir=tmp_path, log=lines.append,
                      train_plays=2, heldout_blocks=8, new_tokens=8)
    assert result.heldout_after < result.heldout_before - 0.05, (result.heldout_before, result.heldout_after)
    assert result.reload_max_diff < 1e-4
    assert 1e6 < result.adapter_bytes < 20e6  # r=8 all-linear: ~9.9 MB in fp32
    text = "\n".join(lines)
    assert "trainable params: 2,442,240 / 136,957,248" in text and "held-out loss after" in text


def test_qlora_demo_trains_on_a_4bit_base_saves_and_reloads(tmp_path):
    lines = []
    result = run_demo(steps=8, batch=4, seq=64, lr=2e-3, out_dir=tmp_path, log=lines.append,
                      train_plays=2, heldout_blocks=8, new_tokens=8, qlora=True)
    text = "\n".join(lines)
    assert "4.127 bits/param" in text and "in NF4" in text
    assert result.heldout_after < result.heldout_before - 0.05, (result.heldout_before, result.heldout_after)
    assert result.reload_max_diff < 1e-4  # onto a freshly quantized base
    assert 1e6 < result.adapter_bytes < 20e6
    with pytest.raises(ValueError, match="4-bit"):
        run_demo(steps=1, config=slimtune.FullConfig(), qlora=True, out_dir=tmp_path)


def test_peft_loads_a_slimtune_adapter_of_the_real_model_with_equal_logits(tmp_path):
    peft = pytest.importorskip("peft")
    model, tok = load_smollm2()
    slimtune.inject(model, slimtune.LoraConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj")))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    slimtune.save_adapter(model, tmp_path)
    base, _ = load_smollm2()
    theirs = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    ids = tok("To be, or not to be, that is the question", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ours_logits, theirs_logits = model(ids).logits, theirs(ids).logits
    assert (ours_logits - theirs_logits).abs().max().item() < 1e-4
