"""Merge / unmerge / unload, and several named adapters on one model."""

import pytest
import torch

import slimtune
from slimtune import LoraConfig, inject
from slimtune.control import adapted_layers
from tests.conftest import randomize_adapters, tiny_bert_cls, tiny_gpt2, tiny_llama, tokens


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_merge_is_idempotent_and_unmerge_restores(build):
    m = build()
    w0 = {n: p.detach().clone() for n, p in m.named_parameters()}
    inject(m, LoraConfig(r=4, target_modules="all-linear"))
    randomize_adapters(m)
    x = tokens()
    before = logits(m, x)
    slimtune.merge(m)
    merged_w = {n: p.detach().clone() for n, p in m.named_parameters()}
    slimtune.merge(m)  # second merge: no-op
    assert all(torch.equal(merged_w[n], p) for n, p in m.named_parameters())
    torch.testing.assert_close(logits(m, x), before, atol=1e-5, rtol=1e-5)
    slimtune.unmerge(m)
    slimtune.unmerge(m)
    for n, p in m.named_parameters():
        key = n.replace(".base_layer", "")
        if key in w0:
            torch.testing.assert_close(p, w0[key], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(m, x), before, atol=1e-5, rtol=1e-5)


def test_merge_and_unload_saves_a_plain_model_transformers_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    m = tiny_llama()
    inject(m, LoraConfig(r=4, target_modules="all-linear"))
    randomize_adapters(m)
    x = tokens()
    expected = logits(m, x)
    plain = slimtune.merge_and_unload(m)
    assert not any("lora" in n or "base_layer" in n for n, _ in plain.named_parameters())
    plain.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded, x), expected, atol=1e-5, rtol=1e-5)


def test_merge_and_unload_keeps_the_trained_copy_of_modules_to_save():
    m = tiny_bert_cls()
    inject(m, LoraConfig(target_modules=("query",), modules_to_save=("classifier",)))
    randomize_adapters(m)
    x = tokens()
    expected = logits(m, x)
    plain = slimtune.merge_and_unload(m)
    assert type(plain.classifier).__name__ == "Linear"
    torch.testing.assert_close(logits(plain, x), expected, atol=1e-5, rtol=1e-5)


def test_safe_merge_names_the_broken_adapter_and_leaves_weights():
    m = tiny_llama()
    inject(m, LoraConfig(r=2, target_modules=("q_proj",)), adapter_name="broken")
    randomize_adapters(m)
    layer = dict(adapted_layers(m))["model.layers.0.self_attn.q_proj"]
    w0 = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.adapters["broken"].lora_B.fill_(float("nan"))
    with pytest.raises(ValueError, match="'broken'.*non-finite"):
        slimtune.merge(m, safe=True)
    assert torch.equal(layer.base_layer.weight, w0) and "broken" not in layer.merged


def test_several_adapters_activate_delete_and_disable():
    m = tiny_llama()
    base_out = logits(m, tokens())
    inject(m, LoraConfig(r=2, target_modules=("q_proj", "v_proj")), adapter_name="a")
    randomize_adapters(m, seed=1)  # only the newest adapter trains: randomize each after injecting it
    inject(m, LoraConfig(r=4, target_modules=("v_proj", "o_proj")), adapter_name="b")
    randomize_adapters(m, seed=2)
    x = tokens()
    assert slimtune.adapter_names(m) == ("a", "b") and slimtune.active_adapters(m) == ("a", "b")
    both = logits(m, x)
    slimtune.set_active(m, "a")
    only_a = logits(m, x)
    slimtune.set_active(m, ["b"])
    only_b = logits(m, x)
    assert not any(torch.allclose(u, v) for u, v in ((only_a, only_b), (both, only_a), (both, only_b),
                                                     (only_a, base_out), (only_b, base_out)))
    # on v_proj, which both adapters wrap, their updates add up: W0 h + dA h + dB h
    v_proj = dict(adapted_layers(m))["model.layers.0.self_attn.v_proj"]
    h = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))

    def delta(names):
        slimtune.set_active(m, names)
        with torch.no_grad():
            return v_proj(h) - v_proj.base_layer(h)

    d_a, d_b, d_ab = delta("a"), delta("b"), delta(("a", "b"))
    assert d_a.abs().max() > 1e-3 and d_b.abs().max() > 1e-3
    torch.testing.assert_close(d_ab, d_a + d_b, atol=1e-6, rtol=1e-5)
    with slimtune.disable_adapters(m):
        torch.testing.assert_close(logits(m, x), base_out)
    slimtune.set_active(m, ("a", "b"))
    slimtune.merge(m)
    with pytest.raises(RuntimeError, match="unmerge"):
        slimtune.set_active(m, "a")
    with slimtune.disable_adapters(m):  # unmerges inside, re-merges after
        torch.testing.assert_close(logits(m, x), base_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(m, x), both, atol=1e-5, rtol=1e-5)
    slimtune.unmerge(m)
    slimtune.delete_adapter(m, "a")
    assert slimtune.adapter_names(m) == ("b",)
    torch.testing.assert_close(logits(m, x), only_b)
    assert "model.layers.0.self_attn.q_proj" not in dict(adapted_layers(m))  # unwrapped: no adapter left
    with pytest.raises(ValueError, match="adapter_name='a': no such adapter"):
        slimtune.delete_adapter(m, "a")
