"""`extract`: a LoRA from a fully fine-tuned model and its base, checked against the tuned model's own logits
(PEFT loads the adapter) and against the Eckart-Young bound of the formed dW."""

import pytest
import torch

from slimtune.inspect.extract import ExtractError, extract_lora
from slimtune.inspect.folders import OutputExistsError
from tests.conftest import tiny_llama, tokens
from tests.inspect.helpers import peft_model

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def fine_tune(base_dir, tuned_dir, rank, scale=0.05, touch_embedding=False):
    """Save tiny_llama to base_dir and a copy with W += low-rank (or full-rank) dW on every linear layer."""
    model = tiny_llama()
    model.save_pretrained(base_dir)
    g = torch.Generator().manual_seed(3)
    deltas = {}
    with torch.no_grad():
        for name, m in model.named_modules():
            if name.endswith(LINEAR):
                o, i = m.weight.shape
                d = scale * torch.randn(o, rank, generator=g) @ torch.randn(rank, i, generator=g)
                m.weight += d
                deltas[name] = d.double()
        if touch_embedding:
            model.model.embed_tokens.weight += 0.01
    model.save_pretrained(tuned_dir)
    return model, deltas


def test_low_rank_fine_tune_is_recovered_exactly_and_loads_in_peft(tmp_path):
    tuned, _ = fine_tune(tmp_path / "base", tmp_path / "tuned", rank=2)
    result = extract_lora(str(tmp_path / "base"), tmp_path / "tuned", 2, tmp_path / "lora")
    assert len(result.layers) == 14 and result.energy == pytest.approx(1.0, abs=1e-9)
    assert all(x.energy > 1 - 1e-9 for x in result.layers) and result.uncaptured == {}
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(tmp_path / "lora")(ids).logits, tuned(ids).logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("exact_below", [10_000, 16])  # exact SVD, then randomized on these small layers
def test_energy_captured_is_the_eckart_young_share(tmp_path, exact_below):
    _, deltas = fine_tune(tmp_path / "base", tmp_path / "tuned", rank=32, touch_embedding=True)
    result = extract_lora(str(tmp_path / "base"), tmp_path / "tuned", 4, tmp_path / "lora", exact_below=exact_below)
    assert all(x.randomized == (exact_below == 16) for x in result.layers)
    num = den = 0.0
    for x in result.layers:
        s = torch.linalg.svdvals(deltas[x.name])
        best = float((s[:4] ** 2).sum() / (s ** 2).sum())
        assert x.energy == pytest.approx(best, rel=1e-3 if exact_below == 16 else 1e-5)
        assert x.norm == pytest.approx(float(s.norm()), rel=1e-5)
        num, den = num + float((s[:4] ** 2).sum()), den + float((s ** 2).sum())
    assert result.energy == pytest.approx(num / den, rel=1e-3)
    assert list(result.uncaptured) == ["model.embed_tokens.weight"]  # tied head: stored once


def test_bad_inputs_are_named_and_leave_nothing(tmp_path):
    fine_tune(tmp_path / "base", tmp_path / "tuned", rank=2)
    with pytest.raises(ExtractError, match="rank=0: must be a positive integer"):
        extract_lora(str(tmp_path / "base"), tmp_path / "tuned", 0, tmp_path / "lora")
    with pytest.raises(ExtractError, match=r"tuned='.*nope': not a Hugging Face model folder"):
        extract_lora(str(tmp_path / "base"), tmp_path / "nope", 2, tmp_path / "lora")
    (tmp_path / "lora").mkdir()
    with pytest.raises(OutputExistsError, match="already exists"):
        extract_lora(str(tmp_path / "base"), tmp_path / "tuned", 2, tmp_path / "lora")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "lora", "tuned"]


def test_a_tuned_model_of_another_shape_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    tiny_llama().save_pretrained(tmp_path / "base")
    other = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ExtractError, match="has shape .* the base's is .*not a fine-tune of this base"):
        extract_lora(str(tmp_path / "base"), tmp_path / "other", 2, tmp_path / "lora")
    assert not (tmp_path / "lora").exists()
