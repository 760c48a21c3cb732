"""`slimtune serve` end to end (a subprocess on 127.0.0.1, the openai client) and its bad-flag errors."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
import torch
from typer.testing import CliRunner

from slimtune.cli import app
from slimtune.train.model import load_tokenizer
from tests.serve.helpers import slimtune_adapter, tiny_vocab_llama
from tests.serve.server import get

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("args, words", [
    (["--adapters", "/no/such/dir"], "--adapters='/no/such/dir': no such folder"),
    (["--adapters", ".", "--quantize", "int8"], "--quantize='int8': must be nf4"),
    (["--adapters", ".", "--base", "/no/model"], "model.name='/no/model'"),
    (["--adapters", ".", "--max-batch", "0"], "--max-batch"),
])
def test_bad_flags_exit_2_with_one_error_line(args, words):
    r = CliRunner().invoke(app, ["serve", *args])
    assert r.exit_code == 2 and words in r.output, r.output


def test_serve_subprocess_answers_the_openai_client(tmp_path):
    base = tmp_path / "tiny"
    model = tiny_vocab_llama()
    model.save_pretrained(base)
    load_tokenizer("smollm2-135m").save_pretrained(base)
    slimtune_adapter(model, tmp_path / "adapters" / "one", 1, r=4)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "slimtune", "serve", "--base", str(base), "--adapters",
                             str(tmp_path / "adapters"), "--port", str(port), "--max-loaded", "1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if get(url + "/health")[0] == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.3)
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        assert {m.id for m in client.models.list().data} == {"tiny", "one"}
        r = client.completions.create(model="one", prompt="Hello", max_tokens=5, temperature=0)
        assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert f"on http://127.0.0.1:{port}/v1" in out  # the default host: this machine only


def served_world(tmp_path: Path, quantized: bool):
    """(base folder, adapters folder, base model as served-to-be, adapter folder): a tiny SmolLM2-vocabulary Llama
    saved as an HF folder and one adapter trained on it (on its NF4 form when ``quantized``)."""
    import copy

    from slimtune.quant import quantize_model

    folder = tmp_path / "tiny"
    model = tiny_vocab_llama(seed=3)
    model.save_pretrained(folder)
    load_tokenizer("smollm2-135m").save_pretrained(folder)
    trained_on = copy.deepcopy(model)
    if quantized:
        quantize_model(trained_on)
    adapter = slimtune_adapter(trained_on, tmp_path / "adapters" / "a", 1, std=0.3, r=4,
                               target_modules=("q_proj", "v_proj", "down_proj"))
    return folder, tmp_path / "adapters", trained_on, adapter


def test_serve_quantize_nf4_through_the_cli_path_equals_peft_on_the_dequantized_base(tmp_path):
    """`slimtune serve --quantize nf4`'s own builder: the qlora adapter serves; greedy text = PEFT merged into the
    weights the 4-bit layers compute with; an fp32-trained adapter dropped in is refused (409)."""
    from slimtune.quant import dequantize_model
    from slimtune.serve.commands import build_server
    from tests.serve.helpers import merged_oracle
    from tests.serve.server import post, running

    folder, adapters, nf4, adapter = served_world(tmp_path, quantized=True)
    slimtune_adapter(tiny_vocab_llama(seed=3), adapters / "later" / "plain", 2, r=4)  # trained on the fp32 base
    app = build_server(str(folder), str(adapters), quantize="nf4")
    plain = nf4
    dequantize_model(plain)
    oracle, tok = merged_oracle(plain, adapter), load_tokenizer("smollm2-135m")
    ids = tok("The cat", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = oracle.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    with running(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        got = client.completions.create(model="a", prompt="The cat", max_tokens=6, temperature=0)
        assert got.choices[0].text == tok.decode(want[0, ids.shape[1]:], skip_special_tokens=True)
        status, body = post(url + "/v1/load_lora_adapter", {"lora_name": "plain", "lora_path": "later/plain"})
    assert status == 409 and "4-bit NF4" in body["error"]["message"], body


def test_serve_bf16_base_through_the_cli_path_answers_close_to_peft(tmp_path):
    """`slimtune serve --dtype bfloat16`: an fp32-trained adapter on the bf16 base; the first-token logits are
    within bf16 rounding of PEFT's on the same bf16 base, and the server answers the openai client."""
    import copy

    from peft import PeftModel

    from slimtune.serve.commands import build_server
    from tests.serve.server import running

    folder, adapters, base, adapter = served_world(tmp_path, quantized=False)
    app = build_server(str(folder), str(adapters), dtype="bfloat16")
    served = app.state.registry.model
    assert next(served.base.parameters()).dtype == torch.bfloat16
    with running(app) as url:  # the first request loads the adapter
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        r = client.chat.completions.create(model="a", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        assert r.usage.completion_tokens == 4
    ids = load_tokenizer("smollm2-135m")("The cat sat", return_tensors="pt")["input_ids"]
    oracle = PeftModel.from_pretrained(copy.deepcopy(base).to(torch.bfloat16), str(adapter)).eval()
    exact = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter)).eval()  # fp32: the error's scale
    with torch.no_grad():
        got = served.forward(ids, ["a"]).logits[0, -1].float()
        want = oracle(ids).logits[0, -1].float()
        ref = exact(ids).logits[0, -1]
        without = served.forward(ids, [None]).logits[0, -1].float()
    bf16_error = (want - ref).abs().max().item()
    assert (got - ref).abs().max().item() <= 2 * bf16_error + 1e-3  # as close to fp32 as PEFT's own bf16 run
    assert (got - without).abs().max().item() > 4 * bf16_error  # and the adapter acts
