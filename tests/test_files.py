"""Adapter folders against Hugging Face PEFT (the oracle), both ways, plus safety and fingerprints."""

import copy
import json
import os
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import slimtune
from slimtune import AdapterFileError, BaseModelMismatch, LoraConfig, load_adapter, save_adapter
from slimtune import inject
from tests.adapter_folders import tiny_llama_seeded
from tests.conftest import conv_toy, randomize_adapters, tiny_bert_cls, tiny_gpt2, tiny_llama, tokens

peft = pytest.importorskip("peft")


def run(model, build):
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0)) if build is conv_toy else tokens()
    with torch.no_grad():
        out = model(x)
    return out if torch.is_tensor(out) else out.logits


CASES = {  # name: (model builder, slimtune config, PEFT task type)
    "llama-all-linear": (tiny_llama, LoraConfig(r=4, alpha=8, target_modules="all-linear"), "CAUSAL_LM"),
    "llama-rslora-patterns": (tiny_llama, LoraConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"),
                                                     use_rslora=True, rank_pattern={"down_proj": 2},
                                                     alpha_pattern={"v_proj": 3.0}), "CAUSAL_LM"),
    "llama-embedding": (tiny_llama, LoraConfig(r=4, target_modules=("embed_tokens", "q_proj")), "CAUSAL_LM"),
    "gpt2-conv1d": (tiny_gpt2, LoraConfig(r=4, target_modules=("c_attn", "c_proj", "c_fc")), "CAUSAL_LM"),
    "bert-cls-head": (tiny_bert_cls, LoraConfig(r=4, target_modules=("query", "value"),
                                                modules_to_save=("classifier",)), "SEQ_CLS"),
    "bert-bias-lora-only": (tiny_bert_cls, LoraConfig(r=2, target_modules=("query", "key"), bias="lora_only"),
                            "SEQ_CLS"),
    "conv-toy": (conv_toy, LoraConfig(r=2, target_modules=("conv1", "conv2", "seq", "head")), None),
}


def peft_config(cfg: LoraConfig, task):
    return peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, target_modules=list(cfg.target_modules)
                           if not isinstance(cfg.target_modules, str) else cfg.target_modules,
                           use_rslora=cfg.use_rslora, rank_pattern=dict(cfg.rank_pattern),
                           alpha_pattern=dict(cfg.alpha_pattern), modules_to_save=list(cfg.modules_to_save) or None,
                           bias=cfg.bias, task_type=task)


@pytest.mark.parametrize("case", list(CASES))
def test_slimtune_file_loads_in_peft_with_equal_outputs(case, tmp_path):
    build, cfg, _ = CASES[case]
    ours = build()
    inject(ours, cfg)
    randomize_adapters(ours)
    save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(build(), tmp_path).eval()
    torch.testing.assert_close(run(theirs, build), run(ours, build), atol=1e-5, rtol=1e-5)
    # merged weights agree too
    merged_ours = slimtune.merge_and_unload(ours).state_dict()
    merged_theirs = theirs.merge_and_unload().state_dict()
    assert set(merged_ours) == set(merged_theirs)
    for k in merged_ours:
        torch.testing.assert_close(merged_ours[k], merged_theirs[k], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_peft_file_loads_in_slimtune_with_equal_outputs_and_same_keys(case, tmp_path):
    build, cfg, task = CASES[case]
    theirs = peft.get_peft_model(build(), peft_config(cfg, task)).eval()
    randomize_adapters(theirs, seed=3)
    theirs.save_pretrained(tmp_path)
    ours = build()
    load_adapter(ours, tmp_path)
    torch.testing.assert_close(run(ours, build), run(theirs, build), atol=1e-5, rtol=1e-5)
    # and what slimtune writes has exactly PEFT's key set
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        # PEFT also writes the whole embedding matrix when an embedding is targeted; slimtune doesn't
        peft_keys = {k for k in f.keys() if not k.endswith("base_layer.weight")}
    save_adapter(ours, tmp_path / "ours")
    with safe_open(str(tmp_path / "ours" / "adapter_model.safetensors"), "pt") as f:
        assert set(f.keys()) == peft_keys


def test_roundtrip_through_slimtune_is_exact_and_records_metadata(tmp_path):
    ours = tiny_llama()
    inject(ours, LoraConfig(r=4, target_modules="all-linear", dropout=0.1))
    randomize_adapters(ours)
    save_adapter(ours, tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["slimtune_version"] == slimtune.__version__
    assert json.loads(meta["slimtune_fingerprint"])["architecture"] == "LlamaForCausalLM"
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and sorted(cfg["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    other = tiny_llama()
    load_adapter(other, tmp_path)
    ours.eval(), other.eval()
    assert torch.equal(run(other, tiny_llama), run(ours, tiny_llama))
    assert other.slimtune_configs["default"] == ours.slimtune_configs["default"]


def test_loading_onto_a_different_base_fails_clearly(tmp_path):
    ours = tiny_llama()
    inject(ours, LoraConfig(r=4, target_modules=("q_proj",)))
    save_adapter(ours, tmp_path)
    other = tiny_llama_seeded(1)  # same architecture, another seed: another base model
    try:
        load_adapter(other, tmp_path)
    except BaseModelMismatch as e:
        assert "q_proj" in str(e)
    else:
        raise AssertionError("an adapter trained on another base loaded without BaseModelMismatch")
    assert slimtune.adapter_names(other) == ()  # nothing left half-injected
    load_adapter(other, tmp_path, check_base=False)  # the user can insist


def test_wrong_shape_base_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    ours = tiny_llama()
    inject(ours, LoraConfig(r=4, target_modules=("q_proj",)))
    save_adapter(ours, tmp_path)
    bigger = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=96, intermediate_size=128,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(AdapterFileError, match=r"has shape \(4, 64\), the model needs \(4, 96\)"):
        load_adapter(bigger, tmp_path)
    assert slimtune.adapter_names(bigger) == ()


def test_same_base_in_bf16_loads_with_a_note(tmp_path):
    ours = tiny_llama()
    inject(ours, LoraConfig(r=4, target_modules=("q_proj",)))
    save_adapter(ours, tmp_path)
    half = tiny_llama().to(torch.bfloat16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_adapter(half, tmp_path)
    assert any("not bit-identical" in str(w.message) or "differ" in str(w.message) for w in caught)


def test_pickle_files_are_refused_with_an_explanation(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}))
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(AdapterFileError, match="pickle"):
        load_adapter(tiny_llama(), tmp_path)


def test_peft_features_slimtune_lacks_are_refused(tmp_path):
    # DoRA is supported now (tests/layers/test_dora.py); LoRA bias vectors are not
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_bias": True,
                                                              "target_modules": ["q_proj"]}))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(AdapterFileError, match="lora_bias"):
        load_adapter(tiny_llama(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"],
                                                              "init_lora_weights": "pissa_niter_4"}))
    with pytest.raises(AdapterFileError, match="init_lora_weights='pissa_niter_4'"):
        load_adapter(tiny_llama(), tmp_path)


def test_mismatched_keys_name_what_is_missing(tmp_path):
    ours = tiny_llama()
    inject(ours, LoraConfig(r=4, target_modules=("q_proj",)))
    save_adapter(ours, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in list(f.keys())[1:]}
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))  # no slimtune metadata: a PEFT-style file
    assert cfg["target_modules"] == ["q_proj"]
    with pytest.raises(AdapterFileError, match="1 missing keys"):
        load_adapter(tiny_llama(), tmp_path)


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    ours = tiny_llama()
    inject(ours, LoraConfig(r=4, target_modules=("q_proj",)))
    save_adapter(ours, tmp_path)
    before = (tmp_path / "adapter_model.safetensors").read_bytes()
    randomize_adapters(ours)

    def explode(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr("slimtune.files.write.save_file", explode)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(ours, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
