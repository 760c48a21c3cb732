"""Fuzz: truncations and random byte flips of a real adapter folder never escape as a raw parser error.

Each case either loads (then every adapter tensor is finite and the right shape) or raises AdapterFileError /
BaseModelMismatch naming the folder, with the model exactly as before the call.
"""

import collections
import random
import shutil
import warnings

import torch

import slimtune
from slimtune import AdapterFileError, BaseModelMismatch, LoraConfig, inject, load_adapter, save_adapter
from slimtune.files.keys import live_tensors
from tests.adapter_folders import CONFIG, WEIGHTS, assert_unchanged, snapshot
from tests.conftest import randomize_adapters, tiny_llama

CASES = 200
SEED = 1234
REASONS = ("not a readable safetensors", "metadata", "manifest", "NaN/inf", "dtype", "has shape", "does not fit",
           "the two files disagree", "mixes files", "peft_type", "required field", "UTF-8", "not valid JSON")


def _mutate(rng: random.Random, weights: bytes, config: bytes) -> tuple[bytes, bytes, str]:
    """One broken copy of the folder's two files, and what was done."""
    header_end = 8 + int.from_bytes(weights[:8], "little")
    kind = rng.choice(["truncate", "flip-header", "flip-data", "flip-config", "flip-both"])
    w, c = bytearray(weights), bytearray(config)
    if kind == "truncate":
        return bytes(w[:rng.randrange(len(w))]), config, kind
    for _ in range(rng.randint(1, 4)):
        if kind in ("flip-header", "flip-both"):
            w[rng.randrange(header_end)] ^= 1 << rng.randrange(8)
        if kind == "flip-data":
            w[rng.randrange(header_end, len(w))] ^= 1 << rng.randrange(8)
        if kind in ("flip-config", "flip-both"):
            c[rng.randrange(len(c))] ^= 1 << rng.randrange(8)
    return bytes(w), bytes(c), kind


def _outcome(model, folder) -> str:
    """Load the broken folder; 'loaded' or the error's type name. Asserts the contract either way."""
    before = snapshot(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_adapter(model, folder)
    except (AdapterFileError, BaseModelMismatch) as e:
        assert str(folder) in str(e), f"error does not name the folder: {e}"
        assert_unchanged(model, before)
        reason = next((r for r in REASONS if r in str(e)), "other")
        return f"{type(e).__name__}: {reason}"
    for key, t in live_tensors(model, "default").items():
        assert torch.isfinite(t).all(), key
    slimtune.delete_adapter(model, "default")
    for (name, flag), p in zip(before[1], model.parameters()):  # loading froze the base; thaw it for the next case
        p.requires_grad_(flag)
    return "loaded"


def test_fuzzed_folders_load_or_raise_a_named_error(tmp_path):
    source = tiny_llama()
    inject(source, LoraConfig(r=2, target_modules=("q_proj", "v_proj")))
    randomize_adapters(source)
    pristine = save_adapter(source, tmp_path / "pristine")
    weights, config = (pristine / WEIGHTS).read_bytes(), (pristine / CONFIG).read_bytes()
    model, rng, seen = tiny_llama(), random.Random(SEED), collections.Counter()
    for i in range(CASES):
        w, c, kind = _mutate(rng, weights, config)
        folder = tmp_path / f"case{i}"
        shutil.copytree(pristine, folder)
        (folder / WEIGHTS).write_bytes(w)
        (folder / CONFIG).write_bytes(c)
        seen[(kind, _outcome(model, folder))] += 1
        shutil.rmtree(folder)
    print(dict(sorted(seen.items())))
    # the loop must exercise both outcomes, else it proves little
    assert sum(n for (_, o), n in seen.items() if o.startswith("AdapterFileError")) > CASES // 4
    assert sum(n for (_, o), n in seen.items() if o == "loaded") > 0
