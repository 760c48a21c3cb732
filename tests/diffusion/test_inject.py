"""slimtune.inject on a diffusers UNet and a CLIP text encoder, against Hugging Face PEFT on the same models."""

from __future__ import annotations

import copy

import pytest
import torch

import slimtune
from slimtune import diffusion
from slimtune.control import adapted_layers

from .conftest import randomize, te_out, tiny_text_encoder, tiny_unet, unet_out


def peft_twin(model, slim_model, peft_kwargs: dict):
    """A copy of ``model`` with PEFT's LoRA (via diffusers'/transformers' add_adapter) holding the same A, B
    (and DoRA magnitude) as ``slim_model``'s slimtune adapter."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    twin = copy.deepcopy(model)
    inject_adapter_in_model(PeftLoraConfig(**peft_kwargs), twin)
    ours = {n: l.adapters["default"] for n, l in adapted_layers(slim_model)}
    theirs = {n: m for n, m in twin.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert sorted(ours) == sorted(theirs)
    with torch.no_grad():
        for name, a in ours.items():
            theirs[name].lora_A["default"].weight.copy_(a.lora_A)
            theirs[name].lora_B["default"].weight.copy_(a.lora_B)
            if hasattr(a, "magnitude"):
                m = theirs[name].lora_magnitude_vector["default"].weight
                m.copy_(a.magnitude.view_as(m))  # PEFT keeps a conv's as (1, c_out, 1, 1)
    return twin.eval()


@pytest.mark.parametrize("targets", [diffusion.UNET_ATTENTION,
                                     diffusion.UNET_ATTENTION + diffusion.UNET_FEEDFORWARD + diffusion.UNET_CONV])
def test_unet_lora_equals_peft(targets):
    base = tiny_unet()
    unet = copy.deepcopy(base)
    report = slimtune.inject(unet, slimtune.LoraConfig(r=4, alpha=8, target_modules=targets,
                                                       rank_pattern={"to_k": 2}, alpha_pattern={"to_v": 3}))
    assert {w.name.rsplit(".", 2)[-1] for w in report.wrapped} >= {"to_q", "to_k", "to_v"}
    assert ("Conv2d" in {w.kind for w in report.wrapped}) == ("conv1" in targets)
    randomize(unet)
    twin = peft_twin(base, unet, dict(r=4, lora_alpha=8, target_modules=list(targets), rank_pattern={"to_k": 2},
                                      alpha_pattern={"to_v": 3}))
    ours = unet_out(unet)
    assert not torch.allclose(ours, unet_out(base), atol=1e-3)  # the adapter does something
    torch.testing.assert_close(ours, unet_out(twin), atol=1e-5, rtol=1e-5)


def test_unet_dora_equals_peft():
    base = tiny_unet()
    unet = copy.deepcopy(base)
    slimtune.inject(unet, slimtune.LoraConfig(r=4, alpha=8, target_modules=diffusion.UNET_ATTENTION, use_dora=True))
    randomize(unet)
    twin = peft_twin(base, unet, dict(r=4, lora_alpha=8, target_modules=list(diffusion.UNET_ATTENTION), use_dora=True))
    torch.testing.assert_close(unet_out(unet), unet_out(twin), atol=1e-5, rtol=1e-5)


def test_text_encoder_lora_equals_peft():
    base = tiny_text_encoder()
    te = copy.deepcopy(base)
    targets = diffusion.TEXT_ENCODER_ATTENTION + diffusion.TEXT_ENCODER_MLP
    slimtune.inject(te, slimtune.LoraConfig(r=2, alpha=5, target_modules=targets))
    randomize(te)
    twin = peft_twin(base, te, dict(r=2, lora_alpha=5, target_modules=list(targets)))
    torch.testing.assert_close(te_out(te), te_out(twin), atol=1e-5, rtol=1e-5)


def test_unet_merge_unmerge_and_unload():
    base = tiny_unet()
    unet = copy.deepcopy(base)
    slimtune.inject(unet, slimtune.LoraConfig(r=4, alpha=8, target_modules=diffusion.UNET_ATTENTION + ("conv1",)))
    randomize(unet)
    adapted = unet_out(unet)
    slimtune.merge(unet)
    torch.testing.assert_close(unet_out(unet), adapted, atol=1e-5, rtol=1e-5)
    slimtune.unmerge(unet)
    torch.testing.assert_close(unet_out(unet), adapted, atol=1e-5, rtol=1e-5)
    with slimtune.disable_adapters(unet):
        torch.testing.assert_close(unet_out(unet), unet_out(base), atol=1e-6, rtol=1e-6)
    plain = slimtune.merge_and_unload(unet)
    assert not list(adapted_layers(plain))
    assert type(plain.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q) is torch.nn.Linear
    torch.testing.assert_close(unet_out(plain), adapted, atol=1e-5, rtol=1e-5)


def test_unet_training_step_moves_only_adapters():
    unet = tiny_unet().train()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    slimtune.inject(unet, slimtune.LoraConfig(r=4, alpha=4, target_modules=diffusion.UNET_ATTENTION))
    trainable = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.1)
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([1, 900]), torch.randn(2, 5, 12)
    for _ in range(2):
        loss = torch.nn.functional.mse_loss(unet(x, t, c).sample, torch.randn_like(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = slimtune.merge_and_unload(copy.deepcopy(unet)).state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.rsplit(".", 2)[-2] in ("to_q", "to_k", "to_v") or ".to_out.0." in k for k in changed)
