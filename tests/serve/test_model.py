"""Loading for serving: what is refused (with the reason) and that a refused load leaves the model untouched."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from slimtune.config import BottleneckConfig
from slimtune.files import AdapterFileError, save_adapter
from slimtune.injection import inject
from slimtune.serve import AdapterRefused, BaseMismatch, MultiAdapterModel
from tests.adapter_folders import assert_unchanged, snapshot, tiny_llama_seeded
from tests.conftest import randomize_adapters, tiny_llama, tokens
from tests.serve.helpers import merged_oracle, peft_adapter, slimtune_adapter


@pytest.fixture
def base():
    return tiny_llama()


def refused(base, folder, error, words):
    served = MultiAdapterModel(copy.deepcopy(base))
    before = snapshot(served.base)
    with pytest.raises(error, match=words):
        served.load("a", folder)
    assert_unchanged(served.base, before)
    assert served.slots == {}


def test_other_base_model_is_refused_by_fingerprint(base, tmp_path):
    folder = slimtune_adapter(tiny_llama_seeded(7), tmp_path / "a", 1, r=4)
    refused(base, folder, BaseMismatch, "trained on a different base model")


def test_a_dora_file_without_its_magnitudes_is_a_named_error(base, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = peft_adapter(base, tmp_path / "p", 1, r=4, use_dora=True, target_modules=["q_proj", "v_proj"])
    weights = folder / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if "layers.1.self_attn.v_proj.lora_magnitude" not in k},
              weights)
    refused(base, folder, AdapterFileError, "DoRA module 'model.layers.1.self_attn.v_proj' needs "
            "lora_magnitude_vector of shape \\(32,\\), found None")


def test_embedding_lora_prompt_tuning_and_modules_to_save_are_refused(base, tmp_path):
    from slimtune.config import PromptTuningConfig
    from slimtune.methods import prepare

    model = copy.deepcopy(base)
    prepare(model, PromptTuningConfig(num_virtual_tokens=3))
    refused(base, save_adapter(model, tmp_path / "pt"), AdapterRefused, "prompt tuning prepends virtual tokens")
    emb = peft_adapter(base, tmp_path / "e", 1, r=4, target_modules=["embed_tokens", "q_proj"])
    refused(base, emb, AdapterRefused, "embed_tokens.* is not a LoRA A/B of a linear layer")
    refused(base, slimtune_adapter(base, tmp_path / "m", 1, r=4, modules_to_save=("lm_head",)), AdapterRefused,
            "modules_to_save")


def test_nf4_scheme_must_match_and_serves_exactly_on_an_nf4_base(base, tmp_path):
    from slimtune.quant import dequantize_model, quantize_model

    nf4 = copy.deepcopy(base)
    quantize_model(nf4)
    folder = slimtune_adapter(nf4, tmp_path / "q", 1, r=4, target_modules=("q_proj", "v_proj", "down_proj"))
    refused(base, folder, BaseMismatch, "trained on a 4-bit NF4 base, this server's base is fp32")
    dora = slimtune_adapter(nf4, tmp_path / "d", 2, r=4, use_dora=True, target_modules=("k_proj", "up_proj"))
    served = MultiAdapterModel(copy.deepcopy(nf4))
    served.load("q", folder)
    served.load("d", dora)  # DoRA's norm uses the dequantized weight, as in QLoRA training
    ids = tokens(3, 8)
    got = served.forward(ids, ["q", None, "d"]).logits
    plain = copy.deepcopy(nf4)
    dequantize_model(plain)  # the oracle: PEFT merged into the dequantized weights the 4-bit layers compute with
    with torch.no_grad():
        torch.testing.assert_close(got[0], merged_oracle(plain, folder)(ids[:1]).logits[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1], plain(ids[1:2]).logits[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[2], merged_oracle(plain, dora)(ids[2:]).logits[0], rtol=1e-5, atol=1e-5)


def test_names_are_validated_and_unique(base, tmp_path):
    folder = slimtune_adapter(base, tmp_path / "a", 1, r=4)
    served = MultiAdapterModel(copy.deepcopy(base))
    for bad in ("", "../x", "a/b", ".hidden", "x" * 65, 3):
        with pytest.raises(ValueError, match="name=.*adapter names are 1-64"):
            served.load(bad, folder)
    served.load("a", folder)
    with pytest.raises(ValueError, match="name='a': an adapter of that name is already loaded"):
        served.load("a", folder)
    with pytest.raises(AdapterFileError, match="is not a folder"):
        served.load("b", tmp_path / "missing")


def test_requests_never_see_a_half_loaded_adapter(base, tmp_path):
    """Loads and unloads of other adapters in a second thread while decoding: no error, the outputs stay (a grown
    max rank pads with zeros: the same sums but for rounding: 1e-5, as everywhere)."""
    a = slimtune_adapter(base, tmp_path / "a", 1, r=4, target_modules="all-linear")
    others = [slimtune_adapter(base, tmp_path / f"o{i}", 10 + i, r=8 + i, target_modules="all-linear")
              for i in range(3)]
    served = MultiAdapterModel(copy.deepcopy(base))
    served.load("a", a)
    ids = tokens(2, 6)
    want = served.forward(ids, ["a", None]).logits
    stop = threading.Event()

    def churn():
        i = 0
        while not stop.is_set():
            served.load(f"o{i}", others[i % 3])  # grows the rank and the slots of every layer
            served.unload(f"o{i}")
            i += 1

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        for _ in range(20):
            torch.testing.assert_close(served.forward(ids, ["a", None]).logits, want, rtol=1e-5, atol=1e-5)
    finally:
        stop.set()
        thread.join()
