"""The server through the official `openai` client on 127.0.0.1 (uvicorn in a thread): models, completions
and chat for several adapters at once, streaming, n, stop, hot load/unload, LRU, every error path, a load test."""

from __future__ import annotations

import concurrent.futures
import copy
import os
import time

import openai
import pytest
import torch

from slimtune.serve.api import Limits
from slimtune.serve.app import create_app
from slimtune.serve.model import MultiAdapterModel
from slimtune.serve.registry import AdapterBusy, AdapterRegistry
from slimtune.train.model import load_tokenizer
from tests.serve.helpers import (bottleneck_adapter, bottleneck_oracle, merged_oracle, peft_adapter, slimtune_adapter,
                                 tiny_vocab_llama)
from tests.serve.server import get, post, running

BASE = "tiny-base"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(base model, tokenizer, adapters dir, {name: folder}, extra folders) for every test here."""
    root = tmp_path_factory.mktemp("serve")
    base, tok = tiny_vocab_llama(), load_tokenizer("smollm2-135m")
    adapters = root / "adapters"
    folders = {
        "qv4": slimtune_adapter(base, adapters / "qv4", 1, r=4, alpha=8, target_modules=("q_proj", "v_proj")),
        "all8": slimtune_adapter(base, adapters / "all8", 2, r=8, alpha=16, target_modules="all-linear"),
        "peft2": peft_adapter(base, adapters / "peft2", 3, r=2, lora_alpha=6, target_modules=["k_proj", "up_proj"]),
    }
    extra = {
        "hot": slimtune_adapter(base, adapters / "extra" / "hot", 4, r=4, target_modules=("o_proj",)),
        "dora": slimtune_adapter(base, adapters / "extra" / "dora", 5, r=4, use_dora=True),
        "bneck": bottleneck_adapter(base, adapters / "extra" / "bneck", 9, size=4),
        "mts": slimtune_adapter(base, adapters / "extra" / "mts", 8, r=4, modules_to_save=("lm_head",)),
        "other": slimtune_adapter(tiny_vocab_llama(seed=7), adapters / "extra" / "other", 6, r=4),
        "outside": slimtune_adapter(base, root / "outside" / "evil", 7, r=4),
    }
    os.symlink(root / "outside" / "evil", adapters / "link")
    return base, tok, adapters, folders, extra


def make_app(world, **kw):
    base, tok, adapters, _, _ = world
    model = MultiAdapterModel(copy.deepcopy(base), tok)
    registry = AdapterRegistry(model, adapters, kw.pop("max_loaded", None))
    return create_app(model, registry, BASE, **kw)


@pytest.fixture(scope="module")
def server(world):
    with running(make_app(world, limits=Limits(max_tokens=64, max_n=4))) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)


def greedy_text(model, tok, prompt: str, n: int) -> str:
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_models_lists_the_base_and_each_adapter_with_parent(client):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {BASE, "qv4", "all8", "peft2"}  # not extra/ (no adapter there), not the symlink out
    assert models[BASE].parent is None and all(models[n].parent == BASE for n in ("qv4", "all8", "peft2"))


def test_concurrent_completions_for_several_adapters_equal_peft_greedy(client, world):
    base, tok, _, folders, _ = world
    prompt = "The capital of France is"
    names = [BASE, "qv4", "all8", "peft2"] * 2
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda m: client.completions.create(model=m, prompt=prompt, max_tokens=12,
                                                                       temperature=0), names))
    for name, r in zip(names, results):
        oracle = base if name == BASE else merged_oracle(base, folders[name])
        assert r.choices[0].text == greedy_text(oracle, tok, prompt, 12), name
        assert r.model == name and r.usage.prompt_tokens == len(tok(prompt)["input_ids"])
        assert r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"
    assert len({r.choices[0].text for r in results}) == 4  # each adapter answers differently


def test_chat_completion_uses_the_chat_template(client, world):
    base, tok, _, folders, _ = world
    messages = [{"role": "user", "content": "Say hi"}]
    r = client.chat.completions.create(model="all8", messages=messages, max_tokens=8, temperature=0)
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = merged_oracle(base, folders["all8"]).generate(ids, attention_mask=torch.ones_like(ids),
                                                            max_new_tokens=8, do_sample=False)
    assert r.choices[0].message.content == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert r.choices[0].message.role == "assistant" and r.usage.prompt_tokens == ids.shape[1]


def test_a_client_leaving_mid_stream_frees_its_row_and_pin(world):
    app = make_app(world, limits=Limits(max_tokens=240))
    submitted = []
    submit = app.state.scheduler.submit
    app.state.scheduler.submit = lambda r: (submitted.append(r), submit(r))
    with running(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        stream = client.completions.create(model="qv4", prompt="Tell me", max_tokens=240, temperature=0, stream=True)
        next(iter(stream))
        stream.close()  # the client goes away after the first piece
        deadline = time.monotonic() + 10
        while app.state.registry.in_use or app.state.scheduler.engine.busy:
            assert time.monotonic() < deadline, "the abandoned request still runs"
            time.sleep(0.05)
    (request,) = submitted
    assert request.cancelled and request.finish_reason is None and len(request.token_ids) < 240


def test_streaming_equals_the_whole_answer_and_ends_with_done(client, server):
    whole = client.completions.create(model="qv4", prompt="Once upon a time", max_tokens=10, temperature=0)
    pieces = list(client.completions.create(model="qv4", prompt="Once upon a time", max_tokens=10, temperature=0,
                                            stream=True))
    assert "".join(p.choices[0].text for p in pieces) == whole.choices[0].text
    assert pieces[-1].choices[0].finish_reason == "length"
    chat = list(client.chat.completions.create(model="peft2", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=6, temperature=0, stream=True))
    assert chat[0].choices[0].delta.role == "assistant" and chat[-1].choices[0].finish_reason == "length"
    status, raw = post(server + "/v1/completions", {"model": "qv4", "prompt": "a", "max_tokens": 3, "stream": True,
                                                    "stream_options": {"include_usage": True}})
    events = [e for e in raw.split("\n\n") if e]
    assert status == 200 and events[-1] == "data: [DONE]" and '"usage"' in events[-2]


def test_n_seed_stop_and_usage(client):
    r = client.completions.create(model="all8", prompt="Hello", max_tokens=10, n=3, temperature=1.0, seed=5)
    again = client.completions.create(model="all8", prompt="Hello", max_tokens=10, n=3, temperature=1.0, seed=5)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == [c.text for c in again.choices]  # seeded: reproducible
    assert len({c.text for c in r.choices}) > 1  # each choice draws its own tokens
    assert r.usage.completion_tokens == 30 and r.usage.total_tokens == 30 + r.usage.prompt_tokens
    full = client.completions.create(model="all8", prompt="Hello", max_tokens=10, temperature=0).choices[0].text
    stop = full[3:5]
    cut = client.completions.create(model="all8", prompt="Hello", max_tokens=10, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("name", ["hot", "dora", "bneck"])  # LoRA, DoRA and bottleneck: all served batched
def test_hot_load_and_unload(client, server, world, name):
    base, tok, _, _, extra = world
    status, body = post(server + "/v1/load_lora_adapter", {"lora_name": name, "lora_path": f"extra/{name}"})
    assert status == 200, body
    assert name in {m.id for m in client.models.list().data}
    r = client.completions.create(model=name, prompt="Hi there", max_tokens=6, temperature=0)
    oracle = bottleneck_oracle(base, extra[name]) if name == "bneck" else merged_oracle(base, extra[name])
    assert r.choices[0].text == greedy_text(oracle, tok, "Hi there", 6)
    assert post(server + "/v1/unload_lora_adapter", {"lora_name": name})[0] == 200
    with pytest.raises(openai.NotFoundError, match=f"'{name}'"):
        client.completions.create(model=name, prompt="Hi", max_tokens=2)


@pytest.mark.parametrize("body, status, param, words", [
    ({"lora_name": "x1", "lora_path": "/etc"}, 400, "lora_path", "absolute paths are refused"),
    ({"lora_name": "x2", "lora_path": "../outside/evil"}, 400, "lora_path", "'..' is refused"),
    ({"lora_name": "x3", "lora_path": "link"}, 403, "lora_path", "resolves outside"),
    ({"lora_name": "../x", "lora_path": "extra/hot"}, 400, "lora_name", "adapter names are"),
    ({"lora_name": "qv4", "lora_path": "extra/hot"}, 400, "lora_name", "exists"),
    ({"lora_name": "x4", "lora_path": "extra/nothing"}, 400, "lora_path", "is not a folder"),
    ({"lora_name": "x5", "lora_path": "extra/other"}, 409, "lora_path", "different base model"),
    ({"lora_name": "x6", "lora_path": "extra/mts"}, 422, "lora_path", "modules_to_save=['lm_head']"),
])
def test_load_errors(server, client, body, status, param, words):
    got, err = post(server + "/v1/load_lora_adapter", body)
    assert got == status and words in err["error"]["message"] and err["error"]["param"] == param, err
    assert body["lora_name"] not in {m.id for m in client.models.list().data} or body["lora_name"] == "qv4"


@pytest.mark.parametrize("kw, error, words", [
    (dict(model="nope"), openai.NotFoundError, "model='nope': no such model"),
    (dict(max_tokens=0), openai.BadRequestError, "max_tokens=0: must be between 1 and 64"),
    (dict(max_tokens=65), openai.BadRequestError, "max_tokens=65"),
    (dict(n=5), openai.BadRequestError, "n=5: must be between 1 and 4"),
    (dict(temperature=3), openai.BadRequestError, "temperature=3"),
    (dict(top_p=0), openai.BadRequestError, "top_p=0"),
    (dict(prompt=""), openai.BadRequestError, "prompt=''"),
    (dict(prompt="word " * 250, max_tokens=10), openai.BadRequestError, "exceeds the model's context of 256"),
    (dict(prompt="word " * 300), openai.BadRequestError, "prompt: 301 tokens; at most 255"),
    (dict(stop=["a", "b", "c", "d", "e"]), openai.BadRequestError, "stop="),
])
def test_request_errors_name_the_field(client, kw, error, words):
    args = dict(model="qv4", prompt="Hi", max_tokens=4) | kw
    with pytest.raises(error, match=words.replace("(", r"\(").replace("[", r"\[")) as info:
        client.completions.create(**args)
    assert info.value.body["message"]  # OpenAI's error JSON: {"error": {"message", "type", "param", "code"}}
    assert set(info.value.body) == {"message", "type", "param", "code"}


def test_malformed_bodies_never_take_the_server_down(server, client):
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe", b'{"model": 3}', b'{"model": "qv4", "prompt": [1.5]}',
                b'{"model": "qv4", "messages": "hi"}'):
        for route in ("/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter"):
            status, body = post(server + route, raw)
            assert status == 400 and body["error"]["type"] == "invalid_request_error", (route, raw, body)
    status, body = get(server + "/v1/nothing")
    assert status == 404 and "error" in body
    assert get(server + "/health")[0] == 200
    assert client.completions.create(model="qv4", prompt="Hi", max_tokens=2).choices[0].text is not None


def test_bearer_auth(world):
    with running(make_app(world, api_key="sekret")) as url:
        with pytest.raises(openai.AuthenticationError, match="API key"):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0)
        assert ok.completions.create(model="all8", prompt="Hi", max_tokens=2).usage.completion_tokens == 2
        assert post(url + "/v1/load_lora_adapter", {"lora_name": "h", "lora_path": "extra/hot"})[0] == 401
        assert get(url + "/health")[0] == 200


def test_lru_evicts_the_least_recent_unpinned_and_reloads_on_demand(world):
    base, tok, adapters, folders, _ = world
    model = MultiAdapterModel(copy.deepcopy(base), tok)
    registry = AdapterRegistry(model, adapters, max_loaded=2)
    registry.acquire("qv4"), registry.release("qv4")
    registry.acquire("all8"), registry.release("all8")
    registry.acquire("qv4"), registry.release("qv4")  # all8 is now the least recent
    registry.acquire("peft2")
    assert set(model.slots) == {"qv4", "peft2"}
    registry.acquire("qv4")  # both loaded ones are pinned: nothing to evict for all8
    registry.wait_s = 0.2
    with pytest.raises(AdapterBusy, match="all 2 loaded adapters") as info:
        registry.acquire("all8")
    assert info.value.status == 503
    with pytest.raises(AdapterBusy, match="in use by 1 running") as info:
        registry.remove("qv4")
    assert info.value.status == 409
    registry.release("peft2")
    registry.acquire("all8")  # evicts peft2, reloads all8 from disk: same outputs as before
    ids = tok(["Hello there"], return_tensors="pt")["input_ids"]
    got = model.forward(ids, ["all8"]).logits[0]
    with torch.no_grad():
        want = merged_oracle(base, folders["all8"])(ids).logits[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bounded_load_test(world, capsys):
    """32 clients x 3 requests over 4 models, all at once: 0 errors; prints throughput and latency percentiles."""
    app = make_app(world, max_batch=16, max_loaded=2)
    with running(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
        names = [BASE, "qv4", "all8", "peft2"]

        def one(i):
            t0 = time.perf_counter()
            r = client.completions.create(model=names[i % 4], prompt=f"Request {i}:", max_tokens=8, temperature=0)
            return time.perf_counter() - t0, r.usage.completion_tokens

        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            results = list(pool.map(one, range(96)))
        wall = time.perf_counter() - t0
    lat = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    assert len(results) == 96 and tokens == 96 * 8
    assert not app.state.registry.in_use and not app.state.scheduler.engine.busy  # every pin released
    with capsys.disabled():
        print(f"\nload test: 96 requests (32 clients, 4 models, max-loaded 2) in {wall:.2f} s: "
              f"{96 / wall:.1f} req/s, {tokens / wall:.0f} tokens/s, p50 {lat[47]:.2f} s, p95 {lat[91]:.2f} s")
