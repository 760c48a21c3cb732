"""LoRA initializations: rsLoRA scaling, PiSSA and OLoRA (each: step-0 output equals the base; same as PEFT)."""

import pytest
import torch

from slimtune import LoraConfig, inject
from slimtune.control import adapted_layers
from tests.conftest import tiny_gpt2, tiny_llama, tokens

peft = pytest.importorskip("peft")


def logits(m):
    with torch.no_grad():
        return m(tokens()).logits


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("use_dora", [False, True])
def test_step0_equals_base_and_weights_equal_peft(init, use_dora):
    cfg = LoraConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"), init=init, use_dora=use_dora)
    ours, base = tiny_llama(), logits(tiny_llama())
    inject(ours, cfg)
    torch.testing.assert_close(logits(ours), base, atol=1e-5, rtol=1e-5)
    layer = dict(adapted_layers(ours))["model.layers.0.self_attn.q_proj"]
    assert layer.adapters["default"].lora_B.abs().sum() > 0  # the adapter holds W0's principal part
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=init,
                                                               target_modules=["q_proj", "v_proj", "down_proj"],
                                                               use_dora=use_dora))
    pq = theirs.base_model.model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(layer.base_layer.weight, pq.base_layer.weight, atol=1e-5, rtol=1e-4)
    # SVD/QR vectors are unique up to sign per rank: compare the products
    a, b = layer.adapters["default"], (pq.lora_A.default.weight, pq.lora_B.default.weight)
    torch.testing.assert_close(a.lora_B @ a.lora_A, b[1] @ b[0], atol=1e-5, rtol=1e-4)


def test_pissa_on_gpt2_conv1d_step0():
    model, base = tiny_gpt2(), logits(tiny_gpt2())
    inject(model, LoraConfig(r=4, target_modules=("c_attn", "c_fc"), init="pissa"))
    torch.testing.assert_close(logits(model), base, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_rslora_scales_the_update_by_alpha_over_sqrt_r(use_rslora):
    # with B != 0 the layer's output is W0 x + s B A x with s = alpha / sqrt(r) (rsLoRA) or alpha / r,
    # and the whole model equals PEFT's with the same A and B
    cfg = LoraConfig(r=16, alpha=8, use_rslora=use_rslora)
    model = tiny_llama()
    inject(model, cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            layer.adapters["default"].lora_B.normal_(0, 0.1, generator=g)
    layer = model.model.layers[0].self_attn.q_proj
    a, x = layer.adapters["default"], torch.randn(3, 64)
    s = 8 / 16 ** 0.5 if use_rslora else 8 / 16
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base_layer(x) + s * (x @ a.lora_A.T @ a.lora_B.T))
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=16, lora_alpha=8, use_rslora=use_rslora,
                                                               target_modules=["q_proj", "v_proj"]))
    for name, p in theirs.named_parameters():
        if "lora_" in name:
            ours = name.replace("base_model.model.", "").replace(".default.weight", "")
            ours = ours.replace("lora_A", "adapters.default.lora_A").replace("lora_B", "adapters.default.lora_B")
            with torch.no_grad():
                p.copy_(model.get_parameter(ours))
    torch.testing.assert_close(logits(model), logits(theirs), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(model), logits(tiny_llama()), atol=1e-3)  # the update is really there


def test_principal_init_on_embedding_is_a_clear_error():
    with pytest.raises(TypeError, match=r"lora.init='pissa': supported on linear layers only"):
        inject(tiny_llama(), LoraConfig(target_modules=("embed_tokens",), init="pissa"))
