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
