"""The real SmolLM2-135M: DoRA file loads in PEFT with equal logits (slow)."""

import pytest
import torch

pytestmark = pytest.mark.slow


def test_smollm2_dora_equals_peft(tmp_path):
    peft = pytest.importorskip("peft")
    import slimtune
    from slimtune.assets import load_smollm2

    model, _ = load_smollm2()
    slimtune.inject(model, slimtune.LoraConfig(r=8, alpha=16, target_modules=("q_proj", "down_proj"), use_dora=True))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.ndim == 2:
                p.add_(torch.randn(p.shape, generator=g) * 1e-2)
    slimtune.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(load_smollm2()[0], tmp_path).eval()
    ids = torch.randint(0, 1000, (1, 32), generator=g)
    with torch.no_grad():
        a, b = model.eval()(ids).logits, theirs(input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)
