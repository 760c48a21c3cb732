"""Generation: greedy equals transformers' generate (with PEFT for adapters) token for token; stops; sampling;
continuous batching gives each request the tokens it gets alone."""

from __future__ import annotations

import copy

import pytest
import torch

from slimtune.serve import MultiAdapterModel
from slimtune.serve.engine import Engine, Request
from slimtune.serve.sampling import SamplingParams, find_stop, nucleus, safe_prefix
from tests.serve.helpers import merged_oracle, three_adapters

PROMPTS = [[5, 17, 33, 2 + 1, 90], [7, 8], [100, 3, 55, 21, 9, 11, 64, 12], [42]]


def hf_greedy(model, prompt, n):
    """transformers' own generate: greedy, n new tokens, its EOS handling."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    ids = out[0, len(prompt):].tolist()
    eos = model.generation_config.eos_token_id
    return ids[:ids.index(eos)] if eos in ids else ids


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base, folders = three_adapters(tmp_path_factory.mktemp("adapters"))
    base.generation_config.eos_token_id = 127  # a token random weights rarely pick first, so runs are long
    served = MultiAdapterModel(copy.deepcopy(base))
    for name, folder in folders.items():
        served.load(name, folder)
    return base, folders, served


def test_greedy_mixed_batch_equals_transformers_peft_generate(setup):
    base, folders, served = setup
    adapters = ["qv4", "peft2", None, "all8"]
    got = served.generate(PROMPTS, adapters, max_tokens=12)
    for prompt, name, completion in zip(PROMPTS, adapters, got):
        oracle = base if name is None else merged_oracle(base, folders[name])
        oracle.generation_config.eos_token_id = 127
        assert completion.token_ids == hf_greedy(oracle, prompt, 12), name
        assert completion.finish_reason == "length" and completion.prompt_tokens == len(prompt)


def test_per_request_max_tokens_and_eos(setup):
    base, _, served = setup
    free = served.generate([PROMPTS[0]], max_tokens=6)[0].token_ids
    base_eos = served.base.generation_config.eos_token_id
    served.base.generation_config.eos_token_id = free[3]  # the 4th greedy token now ends the text
    try:
        got = served.generate([PROMPTS[0], PROMPTS[0]], max_tokens=[6, 2])
    finally:
        served.base.generation_config.eos_token_id = base_eos
    assert got[0].token_ids == free[:3] and got[0].finish_reason == "stop"  # EOS not included
    assert got[1].token_ids == free[:2] and got[1].finish_reason == "length"


def test_request_joining_mid_run_gets_the_tokens_it_gets_alone(setup):
    """Continuous batching: B joins while A is 5 tokens in; both equal their solo runs (greedy)."""
    _, _, served = setup
    alone = {name: served.generate([p], [name], max_tokens=10)[0].token_ids
             for p, name in ((PROMPTS[2], "all8"), (PROMPTS[1], "qv4"))}
    engine = Engine(served)
    a = Request(PROMPTS[2], "all8", SamplingParams(max_tokens=10))
    b = Request(PROMPTS[1], "qv4", SamplingParams(max_tokens=10))
    engine.add(a)
    for _ in range(5):
        engine.step()
    assert len(a.token_ids) == 5 and len(engine.running) == 1
    engine.add(b)
    engine.step()
    assert len(engine.running) == 2  # decoding together
    while engine.busy:
        engine.step()
    assert a.result().token_ids == alone["all8"] and b.result().token_ids == alone["qv4"]


def test_seeded_sampling_is_reproducible_and_differs_by_seed(setup):
    _, _, served = setup
    run = lambda seed: [c.token_ids for c in served.generate(PROMPTS[:2], ["all8", None], max_tokens=8,
                                                              temperature=1.5, seed=seed)]
    assert run(3) == run(3)
    assert run(3) != run(4)


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    p = torch.tensor([0.1, 0.5, 0.3, 0.1])
    torch.testing.assert_close(nucleus(p, 0.7), torch.tensor([0.0, 0.5, 0.3, 0.0]) / 0.8)
    torch.testing.assert_close(nucleus(p, 0.5), torch.tensor([0.0, 1.0, 0.0, 0.0]))
    assert int(torch.multinomial(nucleus(p, 0.4), 1)) == 1


def test_stop_strings_and_streaming_hold_back_a_possible_stop_prefix():
    assert find_stop("hello world. bye", (".", "bye")) == 11
    assert find_stop("hello", ("x",)) is None
    assert safe_prefix("abc EN", ("END",)) == 4  # "EN" may become "END"
    assert safe_prefix("abc E\ufffd", ()) == 5
    with pytest.raises(ValueError, match="top_p=0: must be in"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="max_tokens=0: must be a positive integer"):
        SamplingParams(max_tokens=0)
