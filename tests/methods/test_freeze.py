"""Freeze-tuning and full fine-tuning through the same config and entry point as the adapters."""

import pytest

from slimtune.config import FreezeConfig, FullConfig, config_from_dict
from slimtune.methods import prepare
from tests.conftest import tiny_bert_cls, tiny_gpt2, tiny_llama


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("build, last", [(tiny_llama, "model.layers.1."), (tiny_gpt2, "transformer.h.1."),
                                         (tiny_bert_cls, "bert.encoder.layer.1.")])
def test_last_n_blocks_and_named_modules(build, last):
    model = build()
    report = prepare(model, FreezeConfig(last_n_blocks=1))
    names = trainable(model)
    assert names and all(n.startswith(last) for n in names)
    assert report.trainable_params == sum(p.numel() for n, p in model.named_parameters() if n in names)
    model = build()
    head = {tiny_llama: "lm_head", tiny_gpt2: "ln_f", tiny_bert_cls: "classifier"}[build]
    prepare(model, config_from_dict({"method": "freeze", "last_n_blocks": 0, "modules": [head]}))
    assert trainable(model) and all(head in n for n in trainable(model))


def test_errors_name_field_and_nearest():
    with pytest.raises(ValueError, match=r"freeze.last_n_blocks=5: model.layers has only 2 blocks"):
        prepare(tiny_llama(), FreezeConfig(last_n_blocks=5))
    with pytest.raises(ValueError, match=r"freeze.modules='lm_haed' matches no module.*lm_head"):
        prepare(tiny_llama(), FreezeConfig(last_n_blocks=0, modules=("lm_haed",)))


def test_full_and_full_without_embeddings():
    model = tiny_llama()
    report = prepare(model, FullConfig())
    assert report.trainable_params == report.total_params
    model = tiny_llama()
    report = prepare(model, FullConfig(freeze_embeddings=True))
    assert report.total_params - report.trainable_params == 128 * 64
    assert "model.embed_tokens.weight" not in trainable(model)
