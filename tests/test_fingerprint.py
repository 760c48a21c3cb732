"""The base-model fingerprint: other checkpoints refused, lower-precision copies of the right base noted.

Oracles: the relative difference ||w_now - w_saved|| / ||w_saved|| computed from the full weights, and the
thresholds documented in docs/fingerprint.md (fingerprint.BOUNDS).
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn

import slimtune
from slimtune import fingerprint as fp
from slimtune.fingerprint import BaseModelMismatch
from slimtune.quant import quantize_model
from tests.conftest import tiny_llama


def llama(seed: int = 0) -> nn.Module:
    model = tiny_llama()  # seeds 0 itself
    if seed:
        torch.manual_seed(seed)
        model = type(model)(model.config).eval()  # same architecture and init scale, other weights
    return model


def linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj", "down_proj"))]


def fingerprint(model: nn.Module) -> fp.Fingerprint:
    """Through JSON, as a file stores it."""
    return fp.Fingerprint.from_json(json.loads(json.dumps(fp.compute(model, linears(model)).to_json())))


def fine_tuned(model: nn.Module, relative: float, seed: int = 3) -> nn.Module:
    """A sibling: every adapted weight moved by ``relative`` * ||w|| in a random direction."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in linears(out):
            d = torch.randn(m.weight.shape, generator=g)
            m.weight.add_(d * (relative * m.weight.norm() / d.norm()))
    return out


def test_the_same_weights_give_no_note():
    assert fp.check(fingerprint(llama()), fingerprint(llama())) is None


def test_another_seed_is_refused_naming_layers_difference_and_threshold():
    with pytest.raises(BaseModelMismatch) as err:
        fp.check(fingerprint(llama()), fingerprint(llama(seed=1)))
    msg = str(err.value)
    assert "in 6 of 6 adapted layers" in msg and "model.layers." in msg
    assert f"> {fp.BOUNDS['fp32']:.3g} (saved fp32, now fp32)" in msg and "check_base=False" in msg


@pytest.mark.parametrize("relative, dtype", [(0.01, torch.float32), (0.03, torch.bfloat16)])
def test_a_sibling_fine_tune_above_the_formats_rounding_is_refused(relative, dtype):
    base = llama()
    sibling = fine_tuned(base, relative).to(dtype)
    assert relative > 2 * fp.BOUNDS["fp32" if dtype == torch.float32 else "bf16"]
    with pytest.raises(BaseModelMismatch, match="differ by more than their storage format's rounding"):
        fp.check(fingerprint(base), fingerprint(sibling))


def test_a_sibling_fine_tune_above_nf4_rounding_is_refused_on_a_4bit_copy():
    base = llama()
    sibling = fine_tuned(base, 1.0)
    quantize_model(sibling)
    with pytest.raises(BaseModelMismatch, match=r"now nf4\)"):
        fp.check(fingerprint(base), fingerprint(sibling))


def true_relative_difference(a: nn.Module, b: nn.Module) -> list[float]:
    wa = [fp.dense_weight(m)[0].float() for _, m in linears(a)]
    wb = [fp.dense_weight(m)[0].float() for _, m in linears(b)]
    return [float((y - x).norm() / x.norm()) for x, y in zip(wa, wb)]


@pytest.mark.parametrize("copy_as, fmt", [
    (lambda m: m.to(torch.bfloat16), "bf16"),
    (lambda m: m.to(torch.float16), "fp16"),
    (lambda m: m.to(torch.bfloat16).float(), "bf16"),  # a bf16 checkpoint upcast to float32 still counts as bf16
    (lambda m: (quantize_model(m), m)[1], "nf4"),
    (lambda m: (quantize_model(m, block_size=4096), m)[1], "nf4-coarse"),
])
def test_lower_precision_copies_of_the_right_base_load_with_a_note(copy_as, fmt):
    base = llama()
    low = copy_as(llama())
    assert max(true_relative_difference(base, low)) < fp.BOUNDS[fmt] / 2  # the bound's margin, measured
    note = fp.check(fingerprint(base), fingerprint(low))
    assert note is not None and f"now {fmt}" in note
    assert f"threshold {fp.BOUNDS[fmt]:.3g}" in note and "cannot be told apart" in note
    # and the other way round: trained on the low-precision copy, loaded onto the float32 original
    assert f"saved from {fmt}" in fp.check(fingerprint(low), fingerprint(base))


def test_a_fine_tune_below_the_formats_rounding_cannot_be_told_apart_and_the_note_says_so():
    base = llama()
    sibling = fine_tuned(base, 0.05)
    quantize_model(sibling)
    note = fp.check(fingerprint(base), fingerprint(sibling))
    assert "less than ~30% relative" in note
    slight = fp.check(fingerprint(base), fingerprint(fine_tuned(base, 0.001)))  # below float32's bound
    assert "float32 rounding" in slight and "less than ~0.2% relative" in slight


def test_old_fingerprints_still_load_with_the_old_rule_and_a_note():
    def old(model):  # what slimtune wrote before version 2: checksum and mean |w| per layer
        new = fp.compute(model, linears(model))
        return fp.Fingerprint.from_json({"architecture": new.architecture, "shapes": new.shapes,
                                         "checksum": new.checksum, "mean_abs": new.mean_abs})

    now = lambda model: fp.compute(model, linears(model))  # noqa: E731  (load_adapter computes it fresh)
    saved = old(llama())
    assert fp.check(saved, now(llama())) is None
    assert "old (version 1) fingerprint" in fp.check(saved, now(llama().to(torch.bfloat16)))
    scaled = llama()
    with torch.no_grad():
        for p in scaled.parameters():
            p.mul_(3.0)
    with pytest.raises(BaseModelMismatch, match="mean |w|"):
        fp.check(saved, now(scaled))


@pytest.mark.parametrize("edit, field", [
    (lambda d: d["layers"]["model.layers.0.self_attn.q_proj"].__setitem__(1, "fp8"), "format='fp8'"),
    (lambda d: d["layers"]["model.layers.0.self_attn.q_proj"].__setitem__(2, "AAAA"), "3 bytes, expected 36"),
    (lambda d: d["layers"]["model.layers.0.self_attn.q_proj"].__setitem__(2, "not base64!"), "not base64"),
    (lambda d: d.pop("checksum"), "malformed"),
    (lambda d: d["layers"].__setitem__("model.layers.0.self_attn.q_proj", [[64, 64], "fp32"]), "must be .shape"),
])
def test_a_malformed_fingerprint_is_a_named_error(edit, field):
    d = fp.compute(llama(), linears(llama())).to_json()
    edit(d)
    with pytest.raises(ValueError, match=field):
        fp.Fingerprint.from_json(d)


def test_metadata_stays_small():
    model = llama()
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    text = json.dumps(fp.compute(model, layers).to_json())
    per_layer = (len(text) - 100) / len(layers)
    assert per_layer < 130  # name (~32) + shape + format + 48-character sketch: ~12 KB per 100 layers


# -- through the files -------------------------------------------------------------------------

def saved_adapter(tmp_path, model=None):
    model = model or llama()
    slimtune.inject(model, slimtune.LoraConfig(r=4, target_modules=("q_proj", "v_proj")))
    slimtune.save_adapter(model, tmp_path)
    return tmp_path


def test_load_adapter_refuses_another_seed(tmp_path):
    other = llama(seed=1)
    with pytest.raises(BaseModelMismatch, match=r"q_proj: \d.*> 0.002"):
        slimtune.load_adapter(other, saved_adapter(tmp_path))
    assert slimtune.adapter_names(other) == ()


def test_load_adapter_onto_an_nf4_copy_notes_what_cannot_be_told_apart(tmp_path):
    path = saved_adapter(tmp_path)
    low = llama()
    quantize_model(low)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        slimtune.load_adapter(low, path)
    notes = [str(w.message) for w in caught if "bit-identical" in str(w.message)]
    assert len(notes) == 1 and "NF4" in notes[0] and "cannot be told apart" in notes[0]
