"""Bottleneck adapters: placement per architecture, step 0 equals the base, training, files, no merging."""

import pytest
import torch

import slimtune
from slimtune import inject, load_adapter, save_adapter
from slimtune.config import BottleneckConfig, ConfigError
from slimtune.layers.bottleneck import position_of
from tests.conftest import randomize_adapters, tiny_bert_cls, tiny_gpt2, tiny_llama, tokens


@pytest.mark.parametrize("build, attention, mlp", [
    (tiny_llama, "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"),
    (tiny_gpt2, "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj"),
    (tiny_bert_cls, "bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.0.output.dense"),
])
def test_placement_step0_and_training(build, attention, mlp):
    model = build()
    with torch.no_grad():
        base = model(tokens()).logits
    report = inject(model, BottleneckConfig(size=8))
    names = {w.name for w in report.wrapped}
    assert attention in names and mlp in names and len(names) == 4  # 2 blocks x 2 positions
    assert report.trainable_params == 4 * (2 * 64 * 8 + 8 + 64)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens()).logits, base, atol=0, rtol=0)  # zero up-projection
    model.train()
    out = model(tokens(), labels=tokens() if build is not tiny_bert_cls else torch.tensor([0, 1]))
    out.loss.backward()
    ups = [p for n, p in model.named_parameters() if n.endswith("up.weight")]
    assert ups and all(p.grad.abs().sum() > 0 for p in ups)


def test_mlp_only_and_bad_position():
    model = tiny_llama()
    report = inject(model, BottleneckConfig(size=4, positions=("mlp",)))
    assert all(position_of(w.name) == "mlp" for w in report.wrapped)
    with pytest.raises(ConfigError, match="bottleneck.positions='ffn': must be one of attention, mlp"):
        BottleneckConfig(positions=("ffn",))


def test_merge_is_refused_clearly_and_save_load_round_trips(tmp_path):
    model = tiny_llama()
    inject(model, BottleneckConfig(size=4))
    randomize_adapters(model)
    with torch.no_grad():
        before = model(tokens()).logits
    with pytest.raises(TypeError, match="cannot be merged.*nonlinearity.*not a weight update"):
        slimtune.merge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens()).logits, before)  # nothing half-merged
    save_adapter(model, tmp_path)
    again = tiny_llama()
    load_adapter(again, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(tokens()).logits, before)
