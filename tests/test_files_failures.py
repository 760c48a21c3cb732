"""Every malformed adapter folder gets a named error, and a failed load leaves the model exactly as it was:
state dict bytes, requires_grad flags, module structure and adapter registry (issue items 3 and 4)."""

import json

import pytest
import torch

import slimtune
from slimtune import AdapterFileError, BaseModelMismatch, LoraConfig, inject, load_adapter, save_adapter
from tests.adapter_folders import (CONFIG, WEIGHTS, assert_unchanged, edit_config, read_tensors, snapshot,
                                   write_tensors)
from tests.conftest import randomize_adapters, tiny_llama, tokens

Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def _saved(tmp_path, name, base_scale=1.0, **cfg):
    """A saved adapter folder; ``base_scale`` != 1 trains it on a base whose weight statistics differ, so any
    fingerprint refuses it (the refusal itself is tested in test_files.py; here: what a refusal leaves)."""
    model = tiny_llama()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(base_scale)
    inject(model, LoraConfig(r=4, target_modules=("q_proj", "v_proj"), **cfg))
    randomize_adapters(model)
    return save_adapter(model, tmp_path / name)


def _retensor(folder, change, manifest=True):
    tensors, meta = read_tensors(folder)
    change(tensors)
    if manifest:
        meta["slimtune_manifest"] = json.dumps(sorted(tensors))
    write_tensors(folder, tensors, meta)


def _drop(t, key):
    del t[key]


def _strip_metadata(folder):
    tensors, _ = read_tensors(folder)
    write_tensors(folder, tensors, {"format": "pt"})


# kind: (source folder kwargs, how to break it, error type, what the message must say)
KINDS = {
    "config-not-json": ({}, lambda f: (f / CONFIG).write_text("{not json"), AdapterFileError, "not valid JSON"),
    "config-not-object": ({}, lambda f: (f / CONFIG).write_text("[1, 2]"), AdapterFileError, "JSON object"),
    "config-not-utf8": ({}, lambda f: (f / CONFIG).write_bytes(b'{"r": "\xff"}'), AdapterFileError, "UTF-8"),
    "config-nan": ({}, lambda f: (f / CONFIG).write_text('{"peft_type": "LORA", "r": NaN}'), AdapterFileError,
                   "NaN is not a number"),
    "missing-r": ({}, lambda f: edit_config(f, r=...), AdapterFileError, "required field 'r'"),
    "missing-peft-type": ({}, lambda f: edit_config(f, peft_type=...), AdapterFileError, "'peft_type' is missing"),
    "unloadable-peft-type": ({}, lambda f: edit_config(f, peft_type="IA3"), AdapterFileError,
                             "peft_type='IA3': slimtune loads adapters of type LORA, PROMPT_TUNING"),
    "bad-field-value": ({}, lambda f: edit_config(f, r=-3), AdapterFileError, "r=-3"),
    "config-r-disagrees": ({}, lambda f: edit_config(f, r=8), AdapterFileError, "r=8 but the weights file"),
    "config-says-dora": ({}, lambda f: edit_config(f, use_dora=True), AdapterFileError, "describes a dora adapter"),
    "config-says-bottleneck": ({}, lambda f: (f / CONFIG).write_text(json.dumps(
        {"peft_type": "SLIMTUNE_BOTTLENECK", "slimtune_config": {"method": "bottleneck"}})),
        AdapterFileError, "describes a bottleneck adapter"),
    "weights-truncated": ({}, lambda f: (f / WEIGHTS).write_bytes((f / WEIGHTS).read_bytes()[:3000]),
                          AdapterFileError, "not a readable safetensors"),
    "weights-garbage": ({}, lambda f: (f / WEIGHTS).write_bytes(b"\x20\x00\x00\x00\x00\x00\x00\x00{garbage"),
                        AdapterFileError, "not a readable safetensors"),
    "tensor-int": ({}, lambda f: _retensor(f, lambda t: t.update({f"{Q0}.lora_A.weight": torch.ones(4, 64,
                   dtype=torch.int32)})), AdapterFileError, "dtype torch.int32"),
    "tensor-nan": ({}, lambda f: _retensor(f, lambda t: t[f"{Q0}.lora_B.weight"].__setitem__((0, 0), float("nan"))),
                   AdapterFileError, "NaN/inf"),
    "tensor-inf": ({}, lambda f: _retensor(f, lambda t: t[f"{Q0}.lora_A.weight"].__setitem__((1, 2), float("inf"))),
                   AdapterFileError, "NaN/inf"),
    "tensor-shape": ({}, lambda f: _retensor(f, lambda t: t.update({f"{Q0}.lora_A.weight": torch.zeros(5, 64)})),
                     AdapterFileError, r"has shape \(5, 64\), the model needs \(4, 64\)"),
    "missing-key": ({}, lambda f: _retensor(f, lambda t: _drop(t, f"{Q0}.lora_A.weight")), AdapterFileError,
                    "1 missing keys"),
    "unlisted-key": ({}, lambda f: _retensor(f, lambda t: t.update({"extra": torch.zeros(1)}), manifest=False),
                     AdapterFileError, "manifest"),
    "meta-config-not-json": ({}, lambda f: write_tensors(f, read_tensors(f)[0], {**read_tensors(f)[1],
                             "slimtune_config": "{oops"}), AdapterFileError, "'slimtune_config' is not valid JSON"),
    "meta-fingerprint-malformed": ({}, lambda f: write_tensors(f, read_tensors(f)[0], {**read_tensors(f)[1],
                                   "slimtune_fingerprint": '{"x": 1}'}), AdapterFileError, "slimtune_fingerprint"),
    "peft-target-missing": ({}, lambda f: (_strip_metadata(f), edit_config(f, target_modules=["q_projx"])),
                            AdapterFileError, "does not fit this LlamaForCausalLM.*q_projx"),
    "other-base": ({"base_scale": 3.0}, lambda f: None, BaseModelMismatch, "frozen weights differ"),
    "pissa-other-base": ({"base_scale": 3.0, "init": "pissa"}, lambda f: None, BaseModelMismatch, "differ"),
    "pissa-tensor-shape": ({"init": "pissa"}, lambda f: _retensor(
        f, lambda t: t.update({f"{Q0}.lora_B.weight": torch.zeros(64, 3)})), AdapterFileError, "has shape"),
    "olora-other-base": ({"base_scale": 3.0, "init": "olora"}, lambda f: None, BaseModelMismatch, "differ"),
}


def _model(kind):
    model = tiny_llama()
    if kind == "with-adapter":  # another adapter already there, and a hand-set flag pattern to restore
        inject(model, LoraConfig(r=2, target_modules=("q_proj", "o_proj"), bias="none"), "first")
        model.model.embed_tokens.weight.requires_grad_(True)
    return model


@pytest.mark.parametrize("model_kind", ["fresh", "with-adapter"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_failed_load_raises_a_named_error_and_leaves_the_model_exactly_as_it_was(kind, model_kind, tmp_path):
    source, breaks, error, says = KINDS[kind]
    folder = _saved(tmp_path, "adapter", **source)
    breaks(folder)
    model = _model(model_kind)
    before = snapshot(model)
    with pytest.raises(error, match=says) as caught:
        load_adapter(model, folder)
    assert str(folder) in str(caught.value)  # the message names the folder or the file in it
    assert_unchanged(model, before)


def test_pissa_load_matches_the_trained_model_and_rewrites_w0_only_after_the_checks(tmp_path):
    """A PiSSA file is relative to the residual base: loading onto the original base recomputes it."""
    trained = tiny_llama()
    inject(trained, LoraConfig(r=4, target_modules=("q_proj", "v_proj"), init="pissa"))
    randomize_adapters(trained)
    save_adapter(trained, tmp_path)
    fresh = tiny_llama()
    load_adapter(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(tokens()).logits, trained(tokens()).logits, atol=0, rtol=0)
    w_fresh = fresh.model.layers[0].self_attn.q_proj.base_layer.weight
    torch.testing.assert_close(w_fresh, trained.model.layers[0].self_attn.q_proj.base_layer.weight, atol=0, rtol=0)
    assert fresh.slimtune_configs["default"].init == "pissa"  # saving again writes a PiSSA file again


def test_pissa_file_loads_in_peft_with_equal_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    trained = tiny_llama()
    inject(trained, LoraConfig(r=4, target_modules=("q_proj", "v_proj"), init="pissa"))
    randomize_adapters(trained)
    save_adapter(trained, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens()).logits, trained(tokens()).logits, atol=1e-5, rtol=1e-5)


def test_inject_with_an_unmatched_module_to_save_changes_nothing():
    model = _model("with-adapter")
    before = snapshot(model)
    with pytest.raises(ValueError, match="modules_to_save='headx'"):
        inject(model, LoraConfig(r=2, target_modules=("q_proj",), modules_to_save=("headx",)), "second")
    assert_unchanged(model, before)


def test_inject_failing_part_way_restores_structure_and_flags(monkeypatch):
    """A failure after layers are wrapped (here: copying a module to save) undoes the wrapping and freezing."""
    model = _model("with-adapter")
    before = snapshot(model)

    def fail(*a, **k):
        raise MemoryError("out of memory while copying lm_head")

    monkeypatch.setattr("slimtune.injection.copy.deepcopy", fail)
    with pytest.raises(MemoryError, match="copying lm_head"):
        inject(model, LoraConfig(r=2, target_modules=("q_proj", "v_proj"), modules_to_save=("lm_head",)), "second")
    assert_unchanged(model, before)


def test_inject_prompt_failing_part_way_restores_the_model(monkeypatch):
    from slimtune import PromptTuningConfig
    from slimtune.methods.prompt import inject_prompt

    model = tiny_llama()
    before = snapshot(model)
    monkeypatch.setattr("slimtune.methods.prompt.wrap_saved_modules",
                        lambda *a, **k: (_ for _ in ()).throw(MemoryError("no memory for the copy")))
    with pytest.raises(MemoryError, match="no memory"):
        inject_prompt(model, PromptTuningConfig(num_virtual_tokens=3, modules_to_save=("lm_head",)))
    assert_unchanged(model, before)
    assert not hasattr(model, "slimtune_prompt") and not model._forward_pre_hooks


def test_delete_adapter_refuses_a_merged_adapter_before_removing_anything():
    model = tiny_llama()
    inject(model, LoraConfig(r=2, target_modules=("q_proj", "v_proj")))
    randomize_adapters(model)
    slimtune.merge(model)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="merged into the base weight of model.layers.0.self_attn.q_proj"):
        slimtune.delete_adapter(model, "default")
    assert_unchanged(model, before)


def test_load_refuses_a_taken_name_and_merged_models_before_reading(tmp_path):
    folder = _saved(tmp_path, "a")
    model = _model("with-adapter")
    with pytest.raises(ValueError, match="adapter_name='first'"):
        load_adapter(model, folder, adapter_name="first")
    randomize_adapters(model)
    slimtune.merge(model)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="unmerge"):
        load_adapter(model, folder, adapter_name="second")
    assert_unchanged(model, before)
