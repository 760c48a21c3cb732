"""The real SmolLM2-135M with two adapters behind the server: the openai client's greedy answers equal
transformers + PEFT (merged) token for token, for both adapters in one concurrent batch."""

from __future__ import annotations

import concurrent.futures
import copy

import openai
import pytest
import torch

from slimtune.serve.api import Limits
from slimtune.serve.app import create_app
from slimtune.serve.model import MultiAdapterModel
from slimtune.serve.registry import AdapterRegistry
from tests.serve.helpers import merged_oracle, peft_adapter, slimtune_adapter
from tests.serve.server import running

pytestmark = pytest.mark.slow


def test_openai_client_against_smollm2_with_two_adapters(tmp_path):
    from slimtune.assets import load_smollm2

    base, tok = load_smollm2()
    # small random updates: the text stays language (no near-ties of garbage logits) yet differs from the base
    folders = {"qv": slimtune_adapter(base, tmp_path / "qv", 1, std=0.05, r=8, alpha=16,
                                      target_modules=("q_proj", "v_proj")),
               "mlp": peft_adapter(base, tmp_path / "mlp", 2, std=0.05, r=4, lora_alpha=8, target_modules=["up_proj"])}
    model = MultiAdapterModel(copy.deepcopy(base), tok)
    app = create_app(model, AdapterRegistry(model, tmp_path), "smollm2-135m", limits=Limits(max_tokens=64))
    prompts = {"qv": "The capital of France is", "mlp": "Write a haiku about rain.", "smollm2-135m": "2 + 2 ="}
    with running(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=300)
        assert {m.id for m in client.models.list().data} == {"smollm2-135m", "qv", "mlp"}
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            answers = dict(zip(prompts, pool.map(
                lambda kv: client.completions.create(model=kv[0], prompt=kv[1], max_tokens=16, temperature=0),
                prompts.items())))
    for name, prompt in prompts.items():
        oracle = base if name == "smollm2-135m" else merged_oracle(base, folders[name])
        want = greedy_ids(oracle, tok, prompt)
        assert answers[name].choices[0].text == tok.decode(want, skip_special_tokens=True), name
        assert answers[name].usage.completion_tokens == len(want)
        if name != "smollm2-135m":  # the adapter really changes the answer
            assert want != greedy_ids(base, tok, prompt), name


def greedy_ids(model, tok, prompt: str) -> list[int]:
    """transformers' greedy generate, 16 new tokens, cut before the first EOS."""
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    new = out[0, ids.shape[1]:].tolist()
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or ())
    return new[:next((i for i, t in enumerate(new) if t in eos), len(new))]


def test_serve_a_gguf_base_through_the_cli_builder(tmp_path):
    """`slimtune serve --base model.gguf` (the bundled llama.cpp file, Q4_1): the adapter made on the GGUF-loaded
    base serves, and its greedy answer equals transformers + PEFT merged on that same base."""
    from slimtune.assets import SMOLLM2_GGUF, SMOLLM2_PACKAGE, load_smollm2, package_dir
    from slimtune.serve.commands import build_server
    from slimtune.train.model import load_model

    source = package_dir(SMOLLM2_PACKAGE, "") / SMOLLM2_GGUF
    base, tok = load_model(str(source), "float32"), load_smollm2()[1]
    folder = slimtune_adapter(base, tmp_path / "adapters" / "kv", 3, std=0.05, r=8,
                              target_modules=("k_proj", "v_proj", "o_proj"))
    app = build_server(str(source), str(tmp_path / "adapters"))
    prompt = "The capital of France is"
    with running(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=300)
        assert {m.id for m in client.models.list().data} == {source.stem, "kv"}
        got = client.completions.create(model="kv", prompt=prompt, max_tokens=16, temperature=0)
    want = greedy_ids(merged_oracle(base, folder), tok, prompt)
    assert got.choices[0].text == tok.decode(want, skip_special_tokens=True)
    assert want != greedy_ids(base, tok, prompt)  # the adapter changes the answer
