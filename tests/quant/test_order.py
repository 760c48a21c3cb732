"""quantize_model and inject in either order: output heads, modules_to_save on 4-bit layers, DoRA magnitude."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

import slimtune
from slimtune.quant import Linear4bit, quantize_model
from tests.conftest import randomize_adapters, tiny_bert_cls, tiny_llama, tokens


def bert_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens(), attention_mask=torch.ones(2, 12, dtype=torch.long)).logits


def cls_config(**kw) -> slimtune.LoraConfig:
    return slimtune.LoraConfig(r=4, alpha=8, target_modules=("query", "value"), modules_to_save=("classifier",), **kw)


# -- output heads stay in full precision by default ------------------------------------------------

def test_default_keep_is_the_output_heads_then_modules_to_save_trains():
    # the case: quantize a BERT classifier, then train its head as a module to save
    bert = tiny_bert_cls()
    report = quantize_model(bert)
    assert type(bert.classifier) is torch.nn.Linear and "classifier" in report.kept
    assert isinstance(bert.bert.pooler.dense, Linear4bit)  # only the head is kept, as transformers does
    slimtune.inject(bert, cls_config())
    copy = bert.classifier.copies["default"]
    assert all(p.requires_grad and p.dtype == torch.float32 for p in copy.parameters())


def test_default_keep_keeps_a_score_head_and_explicit_keep_replaces_it():
    from transformers import LlamaForSequenceClassification

    llama_cls = LlamaForSequenceClassification(tiny_llama().config)
    report = quantize_model(llama_cls)
    assert type(llama_cls.score) is torch.nn.Linear and report.kept == ("score",)
    bert = tiny_bert_cls()
    report = quantize_model(bert, keep=())  # explicit: nothing kept, the head is quantized too
    assert isinstance(bert.classifier, Linear4bit) and report.kept == ()


def test_default_keep_sees_the_head_through_a_modules_to_save_wrapper():
    bert = tiny_bert_cls()
    slimtune.inject(bert, cls_config())
    report = quantize_model(bert)
    assert type(bert.classifier.original) is torch.nn.Linear and "classifier" in report.kept


# -- a module to save that is a 4-bit layer ---------------------------------------------------------

@pytest.mark.parametrize("compute_dtype,choice,expected", [
    (torch.float32, "float32", torch.float32),
    (torch.bfloat16, "float32", torch.float32),
    (torch.bfloat16, "base", torch.bfloat16),
], ids=["fp32", "bf16-compute", "bf16-base"])
def test_modules_to_save_of_a_4bit_layer_trains_a_dequantized_copy(compute_dtype, choice, expected):
    bert = tiny_bert_cls()
    quantize_model(bert, keep=(), compute_dtype=compute_dtype)
    head = bert.classifier
    before = bert_logits(bert)
    slimtune.inject(bert, cls_config(adapter_dtype=choice))
    wrapper = bert.classifier
    copy = wrapper.copies["default"]
    assert wrapper.original is head and isinstance(head, Linear4bit)  # the original stays 4-bit and frozen
    assert not any(p.requires_grad for p in head.parameters())
    assert type(copy) is torch.nn.Linear and copy.weight.dtype == expected and copy.bias.dtype == expected
    assert copy.weight.requires_grad and copy.bias.requires_grad
    assert torch.equal(copy.weight, head.dequantize(expected))  # the weight the 4-bit layer computes with
    if compute_dtype == torch.float32:  # same weight, same maths: step 0 is the quantized model
        torch.testing.assert_close(bert_logits(bert), before, rtol=0, atol=1e-6)
    bert.train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=expected == torch.bfloat16):
        loss = bert(tokens(), labels=torch.tensor([0, 2])).loss
    loss.backward()
    assert copy.weight.grad is not None and head.weight.grad is None


def test_4bit_module_to_save_round_trips_with_peft_keys(tmp_path):
    import peft

    bert = tiny_bert_cls()
    quantize_model(bert, keep=())
    slimtune.inject(bert, cls_config())
    randomize_adapters(bert)
    slimtune.save_adapter(bert, tmp_path / "ours")
    other = tiny_bert_cls()
    quantize_model(other, keep=())
    slimtune.load_adapter(other, tmp_path / "ours")
    assert isinstance(other.classifier.original, Linear4bit)
    torch.testing.assert_close(bert_logits(other), bert_logits(bert), rtol=0, atol=0)
    # the keys are PEFT's for the same adapter on the full-precision model
    theirs = peft.get_peft_model(tiny_bert_cls(), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"]))
    theirs.save_pretrained(tmp_path / "peft")
    keys = {}
    for who in ("ours", "peft"):
        with safe_open(str(tmp_path / who / "adapter_model.safetensors"), "pt") as f:
            keys[who] = set(f.keys())
    assert keys["ours"] == keys["peft"] and any("classifier" in k for k in keys["ours"])


# -- DoRA: an untrained adapter is the base in both orders ------------------------------------------

DORA = slimtune.LoraConfig(r=4, alpha=8, target_modules="all-linear", use_dora=True)


def llama_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens()).logits


def test_untrained_dora_is_the_quantized_base_in_both_orders():
    base = tiny_llama()
    quantize_model(base)
    ref = llama_logits(base)  # the quantized model without adapters
    first = tiny_llama()
    quantize_model(first)
    slimtune.inject(first, DORA)
    second = tiny_llama()
    slimtune.inject(second, DORA)
    quantize_model(second)
    torch.testing.assert_close(llama_logits(first), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(llama_logits(second), ref, rtol=0, atol=1e-5)


def test_dora_at_init_with_pissa_equals_lora_after_quantizing():
    # PiSSA puts W0's principal part in B A (B != 0 at init); an untouched DoRA then scales by exactly 1,
    # so after quantizing the residual it must equal plain PiSSA LoRA on the same quantized residual
    lora, dora = tiny_llama(), tiny_llama()
    kw = dict(r=4, alpha=8, target_modules=("q_proj", "v_proj"), init="pissa")
    slimtune.inject(lora, slimtune.LoraConfig(**kw))
    slimtune.inject(dora, slimtune.LoraConfig(use_dora=True, **kw))
    quantize_model(lora)
    quantize_model(dora)
    torch.testing.assert_close(llama_logits(dora), llama_logits(lora), rtol=0, atol=1e-5)


def test_quantizing_under_a_trained_dora_adapter_is_refused_and_changes_nothing():
    model = tiny_llama()
    slimtune.inject(model, DORA)
    randomize_adapters(model)  # B != 0, magnitude moved: a trained adapter
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj carries a trained DoRA adapter "
                                         r"'default'.*merge"):
        quantize_model(model)
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert not any(isinstance(m, Linear4bit) for m in model.modules())
