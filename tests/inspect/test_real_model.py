"""inspect / compress / extract / report on the real SmolLM2-135M (slow: ~1 minute each)."""

import peft
import pytest
import torch

import slimtune
from slimtune.assets import load_smollm2, smollm2_path
from slimtune.inspect.adapter import inspect_adapter
from slimtune.inspect.compress import compress_adapter
from slimtune.inspect.extract import extract_lora
from slimtune.inspect.outputs import adapter_logit_error, sample_tokens
from slimtune.inspect.report import build_report

pytestmark = pytest.mark.slow


def peft_logits(folder, ids):
    model = peft.PeftModel.from_pretrained(load_smollm2()[0], folder).eval()
    with torch.no_grad():
        return model(ids).logits


def test_compress_a_real_adapter_reports_the_logit_error_peft_sees(tmp_path):
    model, _ = load_smollm2()
    torch.manual_seed(0)  # lora_A's random init: the same adapter every run
    slimtune.inject(model, slimtune.LoraConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj")))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in slimtune.control.adapted_layers(model):
            a = layer.adapters["default"]
            a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g) * 2e-3)
    slimtune.save_adapter(model, tmp_path / "a", base_model_name_or_path="smollm2-135m")
    stats = inspect_adapter(tmp_path / "a")
    assert len(stats.modules) == 60 and stats.ranks == [8] and stats.fingerprint.startswith("LlamaForCausalLM")
    compress_adapter(tmp_path / "a", tmp_path / "c", rank=4)
    reported = adapter_logit_error("smollm2-135m", tmp_path / "a", tmp_path / "c")
    ids = sample_tokens(model.config.vocab_size)
    with torch.no_grad():
        z0 = load_smollm2()[0](ids).logits
    z_ref, z_new = peft_logits(tmp_path / "a", ids), peft_logits(tmp_path / "c", ids)
    assert reported.relative == pytest.approx(float((z_new - z_ref).norm() / (z_ref - z0).norm()), rel=1e-3)
    # a generic rank-8 update cut to rank 4 loses about half its energy: the logits must visibly move (the size
    # of the move relative to the adapter's own effect depends on the model; the oracle check is the line above)
    assert reported.relative > 0.05
    page = build_report(tmp_path / "a", tmp_path / "r.html").read_text()
    assert page.count("data:image/png") == 3 and page.count("<tr>") == 61


def test_extract_recovers_a_low_rank_change_of_the_real_model(tmp_path):
    model, _ = load_smollm2()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, m in model.named_modules():
            if name.endswith("q_proj"):
                o, i = m.weight.shape
                m.weight += 0.02 * torch.randn(o, 2, generator=g) @ torch.randn(2, i, generator=g)
    model.save_pretrained(tmp_path / "tuned")
    result = extract_lora(str(smollm2_path()), tmp_path / "tuned", 2, tmp_path / "lora")
    assert len(result.layers) == 210 and result.energy == pytest.approx(1.0, abs=1e-6)
    ids = sample_tokens(model.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(peft_logits(tmp_path / "lora", ids), model(ids).logits, rtol=0, atol=2e-3)
