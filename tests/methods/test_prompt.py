"""Prompt tuning against Hugging Face PEFT's prompt tuning (the oracle): logits, loss, generate, files."""

import pytest
import torch

import slimtune
from slimtune.config import PromptTuningConfig
from slimtune.files import load_adapter, save_adapter
from slimtune.methods import prepare
from slimtune.methods.prompt import prompt_of
from tests.conftest import tiny_bert_cls, tiny_llama, tokens

peft = pytest.importorskip("peft")
N = 5


def peft_twin(ours):
    theirs = peft.get_peft_model(tiny_llama(), peft.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                      num_virtual_tokens=N)).eval()
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.copy_(prompt_of(ours).embedding)
    return theirs


def test_logits_loss_and_generate_equal_peft():
    ours = tiny_llama()
    report = prepare(ours, PromptTuningConfig(num_virtual_tokens=N))
    assert report.trainable_params == N * 64
    theirs = peft_twin(ours)
    ids = tokens()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding in row 0
    with torch.no_grad():
        a = ours(input_ids=ids, attention_mask=mask, labels=ids)
        b = theirs(input_ids=ids, attention_mask=mask, labels=ids)
    assert a.logits.shape == (2, N + ids.shape[1], 128)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.loss, b.loss)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert torch.equal(ours.generate(ids, **kw), theirs.generate(input_ids=ids, **kw))


def test_only_the_prompt_trains_and_disable_runs_the_base():
    ours, base = tiny_llama(), tiny_llama()
    prepare(ours, PromptTuningConfig(num_virtual_tokens=N))
    ours(tokens(), labels=tokens()).loss.backward()
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == ["slimtune_prompt.embedding"]
    assert prompt_of(ours).embedding.grad.abs().sum() > 0
    with torch.no_grad(), slimtune.disable_adapters(ours):
        torch.testing.assert_close(ours(tokens()).logits, base(tokens()).logits)
    with pytest.raises(TypeError, match="nothing to merge"):
        slimtune.merge(ours)


def test_files_both_ways(tmp_path):
    ours = tiny_llama()
    prepare(ours, PromptTuningConfig(num_virtual_tokens=N))
    save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=tokens()).logits, ours(tokens()).logits)
    theirs.save_pretrained(tmp_path / "peft")
    again = tiny_llama()
    load_adapter(again, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(again(tokens()).logits, ours(tokens()).logits)
    slimtune.delete_adapter(again, "default")
    with torch.no_grad():
        torch.testing.assert_close(again(tokens()).logits, tiny_llama()(tokens()).logits)


def test_text_init_and_encoder_classifier():
    class Tok:
        def __call__(self, text):
            return {"input_ids": [ord(c) % 128 for c in text]}

    model = tiny_llama()
    prepare(model, PromptTuningConfig(num_virtual_tokens=N, init="text", init_text="abc"), tokenizer=Tok())
    emb = model.get_input_embeddings().weight
    torch.testing.assert_close(prompt_of(model).embedding, emb[[97, 98, 99, 97, 98]])
    with pytest.raises(ValueError, match="pass tokenizer="):
        prepare(tiny_llama(), PromptTuningConfig(init="text", init_text="abc"))
    bert = tiny_bert_cls()  # sequence labels are left alone; token_type_ids are dropped
    prepare(bert, PromptTuningConfig(num_virtual_tokens=N))
    out = bert(input_ids=tokens(), attention_mask=torch.ones_like(tokens()), token_type_ids=torch.zeros_like(tokens()),
               labels=torch.tensor([0, 2]))
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, torch.tensor([0, 2])))
    out.loss.backward()
    assert prompt_of(bert).embedding.grad.abs().sum() > 0


def test_classifier_head_trains_with_the_prompt_and_files_match_peft_both_ways(tmp_path):
    bert = tiny_bert_cls()
    report = prepare(bert, PromptTuningConfig(num_virtual_tokens=N, modules_to_save=("classifier",)))
    head = bert.get_submodule("classifier").current()
    trainable = sorted(n for n, p in bert.named_parameters() if p.requires_grad)
    assert trainable == ["classifier.copies.default.bias", "classifier.copies.default.weight",
                         "slimtune_prompt.embedding"]
    assert report.trainable_params == N * 64 + 64 * 3 + 3
    ids, labels = tokens(), torch.tensor([0, 2])
    bert(input_ids=ids, labels=labels).loss.backward()
    assert head.weight.grad.abs().sum() > 0
    with torch.no_grad():
        head.weight.add_(0.5)  # a trained head differs from the base's
    save_adapter(bert, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tiny_bert_cls(), tmp_path / "ours").eval()
    bert.eval()
    with torch.no_grad():
        want = bert(input_ids=ids).logits
        torch.testing.assert_close(theirs(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
    theirs.save_pretrained(tmp_path / "peft")  # lists modules_to_save as classifier, score, classifier, score
    again = tiny_bert_cls()
    load_adapter(again, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
    slimtune.delete_adapter(again, "default")
    assert "TrainedCopy" not in {type(m).__name__ for m in again.modules()}


def test_prompt_modules_to_save_that_match_nothing_leave_the_model_untouched():
    bert = tiny_bert_cls()
    with pytest.raises(ValueError, match="prompt.modules_to_save"):
        prepare(bert, PromptTuningConfig(num_virtual_tokens=N, modules_to_save=("clasifier",)))
    assert all(p.requires_grad for p in bert.parameters()) and prompt_of(bert) is None


def test_prompt_report_on_a_4bit_base_counts_weights_not_packed_bytes():
    plain = prepare(tiny_llama(), PromptTuningConfig(num_virtual_tokens=N))
    quantized = tiny_llama()
    slimtune.quantize_model(quantized)
    report = prepare(quantized, PromptTuningConfig(num_virtual_tokens=N))
    assert (report.trainable_params, report.total_params) == (plain.trainable_params, plain.total_params)


def test_set_active_turns_the_prompt_off_and_on_as_disable_adapters_does():
    ours, base = tiny_llama(), tiny_llama()
    prepare(ours, PromptTuningConfig(num_virtual_tokens=N))
    slimtune.inject(ours, slimtune.LoraConfig(r=2, target_modules=("q_proj",)), adapter_name="lora")
    with torch.no_grad():
        for layer in ours.modules():
            if hasattr(layer, "lora_B"):
                layer.lora_B.normal_(0, 0.5)
    ids = tokens()
    with torch.no_grad():
        both, plain = ours(ids).logits, base(ids).logits
        assert both.shape[1] == N + ids.shape[1]
        slimtune.set_active(ours, [])
        torch.testing.assert_close(ours(ids).logits, plain)  # no prompt, no LoRA: the base model
        slimtune.set_active(ours, "lora")
        only_lora = ours(ids).logits
        assert only_lora.shape == plain.shape and not torch.allclose(only_lora, plain)
        slimtune.set_active(ours, "default")
        only_prompt = ours(ids).logits
        assert only_prompt.shape == both.shape and not torch.allclose(only_prompt, both)
        slimtune.set_active(ours, ["default", "lora"])
        torch.testing.assert_close(ours(ids).logits, both)
        with slimtune.disable_adapters(ours):
            torch.testing.assert_close(ours(ids).logits, plain)
        torch.testing.assert_close(ours(ids).logits, both)
