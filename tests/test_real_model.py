"""The real SmolLM2-135M (slow: tens of seconds on a 2-core CPU). Training runs on it: tests/train/test_run*.py."""

import pytest
import torch

import slimtune
from slimtune.assets import load_smollm2

pytestmark = pytest.mark.slow


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
