"""`compress`: the result loads in PEFT and in slimtune, with the error it reports; lossless on a rank-deficient
update; DoRA keeps its magnitude; bad input is named and leaves nothing on disk."""

import json

import pytest
import torch
from safetensors import safe_open

import slimtune
from slimtune.files import AdapterFileError
from slimtune.inspect.compress import CompressError, compress_adapter
from slimtune.inspect.folders import OutputExistsError
from slimtune.inspect.outputs import adapter_logit_error, sample_tokens
from tests.conftest import tiny_llama, tokens
from tests.inspect.helpers import low_rank_adapter, peft_adapter, peft_deltas, peft_model, slimtune_adapter


def slimtune_logits(folder, ids):
    model = tiny_llama()
    slimtune.load_adapter(model, folder)
    with torch.no_grad():
        return model(ids).logits


def peft_logits(folder, ids):
    with torch.no_grad():
        return peft_model(folder)(ids).logits


@pytest.mark.parametrize("how", [{"rank": 2}, {"energy": 1.0}])
def test_rank_deficient_update_compresses_losslessly(tmp_path, how):
    src = low_rank_adapter(tmp_path / "a", true_rank=2, r=8)
    result = compress_adapter(src, tmp_path / "c", **how)
    assert {m.r_after for m in result.modules} == {2}
    assert result.bytes_after < 0.4 * result.bytes_before and result.params_after == result.params_before // 4
    assert max(m.output_error for m in result.modules) < 1e-6 and result.energy_kept == pytest.approx(1.0)
    ids = tokens()
    reference = slimtune_logits(src, ids)
    torch.testing.assert_close(peft_logits(tmp_path / "c", ids), reference, rtol=0, atol=2e-5)
    torch.testing.assert_close(slimtune_logits(tmp_path / "c", ids), reference, rtol=0, atol=2e-5)


def test_truncated_adapter_loads_in_peft_with_the_error_reported(tmp_path):
    src = slimtune_adapter(tmp_path / "a")  # random rank-4 factors: truncating to 2 loses something
    result = compress_adapter(src, tmp_path / "c", rank=2)
    before, after = peft_deltas(src), peft_deltas(tmp_path / "c")
    for m in result.modules:
        dW, dW2 = before[m.name], after[m.name]
        s = torch.linalg.svdvals(dW)
        assert m.energy_kept == pytest.approx(float((s[:2] ** 2).sum() / (s ** 2).sum()), rel=1e-4)
        X = torch.randn(4096, dW.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(9))
        measured = float(torch.linalg.matrix_norm(X @ (dW2 - dW).T) / torch.linalg.matrix_norm(X @ dW.T))
        assert m.output_error == pytest.approx(measured, rel=0.1)  # 256 vs 4096 random inputs
    ids = tokens()
    torch.testing.assert_close(peft_logits(tmp_path / "c", ids), slimtune_logits(tmp_path / "c", ids),
                               rtol=0, atol=2e-5)


def test_logit_error_with_a_base_is_what_peft_measures(tmp_path):
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    src = slimtune_adapter(tmp_path / "a")
    compress_adapter(src, tmp_path / "c", rank=1)
    reported = adapter_logit_error(str(base), src, tmp_path / "c")
    ids = sample_tokens(128)
    with torch.no_grad():
        z0 = tiny_llama()(ids).logits
    z_ref, z_new = peft_logits(src, ids), peft_logits(tmp_path / "c", ids)
    assert reported.relative == pytest.approx(float((z_new - z_ref).norm() / (z_ref - z0).norm()), rel=1e-4)
    assert reported.max_abs == pytest.approx(float((z_new - z_ref).abs().max()), rel=1e-4)
    assert reported.relative > 0.05 and reported.tokens == ids.numel()


def test_energy_mode_writes_per_module_ranks_peft_honours(tmp_path):
    src = slimtune_adapter(tmp_path / "a", r=8, alpha=16)
    result = compress_adapter(src, tmp_path / "c", energy=0.7)
    ranks = {m.name: m.r_after for m in result.modules}
    assert len(set(ranks.values())) > 1  # different modules keep different ranks
    assert all(m.energy_kept >= 0.7 for m in result.modules)
    model = peft_model(tmp_path / "c")
    for name, module in model.named_modules():
        if name.removeprefix("base_model.model.") in ranks and hasattr(module, "lora_A"):
            assert module.lora_A["default"].weight.shape[0] == ranks[name.removeprefix("base_model.model.")]
    config = json.loads((tmp_path / "c" / "adapter_config.json").read_text())
    assert config["r"] == max(ranks.values()) and config["rank_pattern"]


def test_peft_saved_adapter_compresses_and_reloads_in_peft(tmp_path):
    src = peft_adapter(tmp_path / "p", target_modules=["q_proj", "v_proj"], r=6)
    result = compress_adapter(src, tmp_path / "c", rank=3)
    assert {m.r_after for m in result.modules} == {3}
    ids = tokens()
    z_ref, z_new = peft_logits(src, ids), peft_logits(tmp_path / "c", ids)
    with torch.no_grad():
        z0 = tiny_llama()(ids).logits
    assert 0 < float((z_new - z_ref).abs().max()) < float((z_ref - z0).abs().max())  # smaller than the effect
    torch.testing.assert_close(slimtune_logits(tmp_path / "c", ids), z_new, rtol=0, atol=2e-5)


def test_dora_keeps_its_magnitude_vector(tmp_path):
    src = low_rank_adapter(tmp_path / "a", true_rank=1, r=4, use_dora=True, target_modules=["q_proj", "v_proj"])
    compress_adapter(src, tmp_path / "c", rank=1)
    with safe_open(str(src / "adapter_model.safetensors"), "pt") as f, \
            safe_open(str(tmp_path / "c" / "adapter_model.safetensors"), "pt") as g:
        mags = [k for k in f.keys() if "magnitude" in k]
        assert len(mags) == 4 and all(torch.equal(f.get_tensor(k), g.get_tensor(k)) for k in mags)
    ids = tokens()
    torch.testing.assert_close(peft_logits(tmp_path / "c", ids), slimtune_logits(src, ids), rtol=0, atol=2e-5)


@pytest.mark.parametrize("how, needle", [
    ({}, "give exactly one"), ({"rank": 2, "energy": 0.9}, "give exactly one"),
    ({"rank": 0}, "rank=0: must be a positive integer"), ({"energy": 1.5}, r"energy=1.5: must be in \(0, 1\]"),
])
def test_bad_choice_is_named(tmp_path, how, needle):
    with pytest.raises(CompressError, match=needle):
        compress_adapter(slimtune_adapter(tmp_path / "a"), tmp_path / "c", **how)
    assert not (tmp_path / "c").exists()


def test_existing_output_is_refused_and_left_alone(tmp_path):
    src = slimtune_adapter(tmp_path / "a")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "mine.txt").write_text("keep")
    with pytest.raises(OutputExistsError, match="already exists"):
        compress_adapter(src, tmp_path / "c", rank=2)
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["mine.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "c"]  # no temp folder left


def test_methods_without_low_rank_factors_are_refused(tmp_path):
    model = tiny_llama()
    slimtune.inject(model, slimtune.BottleneckConfig(size=8, target_modules=("down_proj",)))
    slimtune.save_adapter(model, tmp_path / "b")
    with pytest.raises(CompressError, match="a bottleneck adapter; compress truncates LoRA and DoRA"):
        compress_adapter(tmp_path / "b", tmp_path / "c", rank=2)
    with pytest.raises(AdapterFileError, match="is not a folder"):
        compress_adapter(tmp_path / "missing", tmp_path / "c", rank=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_write_failure_leaves_nothing(tmp_path, monkeypatch):
    import slimtune.inspect.compress as compress

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(compress, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        compress_adapter(slimtune_adapter(tmp_path / "a"), tmp_path / "c", rank=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_conv_and_embedding_factors_keep_their_shapes_through_peft(tmp_path):
    """Conv LoRA (A: (r, c_in, k, k), B: (c_out, r, 1, 1)) and embedding LoRA flatten for the SVD and are
    written back in PEFT's shapes: PEFT reloads them, and a rank-1 truncation of a rank-1 update is exact."""
    import peft

    from tests.conftest import conv_toy

    def make(model_fn, targets, folder):
        model = peft.get_peft_model(model_fn(), peft.LoraConfig(r=4, lora_alpha=4, target_modules=targets))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_A" in name or "lora_embedding_A" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
                elif "lora_B" in name or "lora_embedding_B" in name:  # rank 1: every column a multiple of one
                    col = torch.randn(p.shape[0], 1, *p.shape[2:], generator=g)
                    p.copy_(col * torch.randn(1, p.shape[1], *([1] * (p.dim() - 2)), generator=g) * 0.1)
        model.save_pretrained(folder)
        return model.eval()

    cases = [(conv_toy, ["conv1", "seq"], torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(1))),
             (tiny_llama, ["embed_tokens", "q_proj"], tokens())]
    for i, (model_fn, targets, x) in enumerate(cases):
        src = make(model_fn, targets, tmp_path / f"src{i}")
        result = compress_adapter(tmp_path / f"src{i}", tmp_path / f"c{i}", rank=1)
        assert {m.r_after for m in result.modules} == {1}
        reloaded = peft.PeftModel.from_pretrained(model_fn(), tmp_path / f"c{i}").eval()
        with torch.no_grad():
            ref, got = src(x), reloaded(x)
        ref, got = getattr(ref, "logits", ref), getattr(got, "logits", got)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
