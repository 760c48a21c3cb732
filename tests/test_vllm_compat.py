"""Saving an adapter vLLM will refuse warns with the reason (vLLM 0.32's checks, vllm/lora/peft_helper.py)."""

from __future__ import annotations

import json
import subprocess
import warnings
from pathlib import Path

import pytest

from slimtune import BottleneckConfig, LoraConfig, PromptTuningConfig, save_adapter
from slimtune.methods import prepare
from slimtune.files.vllm_compat import VllmIncompatibleWarning, vllm_refusals
from tests.conftest import tiny_bert_cls, tiny_llama

VLLM_PYTHON = Path(__file__).resolve().parents[1] / "benchmarks" / ".venv-vllm" / "bin" / "python"

REFUSED = {  # name: (model builder, config, words the warning must hold)
    "dora": (tiny_llama, LoraConfig(r=4, use_dora=True), "use_dora=true"),
    "lm_head": (tiny_llama, LoraConfig(r=4, modules_to_save=("lm_head",)), "modules_to_save=['lm_head']"),
    "bias": (tiny_bert_cls, LoraConfig(r=2, target_modules=("query",), bias="lora_only"), "bias='lora_only'"),
    "pissa": (tiny_llama, LoraConfig(r=4, init="pissa"), "init_lora_weights='pissa'"),
    "bottleneck": (tiny_llama, BottleneckConfig(size=4), "vLLM serves LoRA adapters only"),
    "prompt": (tiny_llama, PromptTuningConfig(num_virtual_tokens=3), "vLLM serves LoRA adapters only"),
}
ACCEPTED = {
    "lora": (tiny_llama, LoraConfig(r=4, target_modules="all-linear", use_rslora=True)),
    "classifier_head": (tiny_bert_cls, LoraConfig(r=2, target_modules=("query",), modules_to_save=("classifier",))),
}


def saved(build, cfg, folder: Path) -> tuple[list[warnings.WarningMessage], dict]:
    model = build()
    prepare(model, cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        save_adapter(model, folder)
    return ([w for w in caught if issubclass(w.category, VllmIncompatibleWarning)],
            json.loads((folder / "adapter_config.json").read_text()))


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_saving_what_vllm_refuses_warns_with_the_reason_and_still_saves(name, tmp_path):
    build, cfg, words = REFUSED[name]
    caught, config = saved(build, cfg, tmp_path / name)
    assert len(caught) == 1 and words in str(caught[0].message) and str(tmp_path / name) in str(caught[0].message)
    assert (tmp_path / name / "adapter_model.safetensors").is_file() and vllm_refusals(config)


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_plain_lora_and_a_classifier_head_save_without_a_warning(name, tmp_path):
    caught, config = saved(*ACCEPTED[name], tmp_path / name)
    assert caught == [] and vllm_refusals(config) == []


@pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="vLLM's venv (benchmarks/serve_vs_vllm.py builds it) is absent")
def test_the_reasons_agree_with_vllms_own_check(tmp_path):
    """vLLM's PEFTHelper on every config slimtune wrote: it refuses exactly those we warn about."""
    folders = {}
    for name, (build, cfg, _) in {**REFUSED, **{k: (*v, "") for k, v in ACCEPTED.items()}}.items():
        if name in ("bottleneck", "prompt"):  # not LoRA: vLLM's helper does not even parse them
            continue
        saved(build, cfg, tmp_path / name)
        folders[name] = str(tmp_path / name / "adapter_config.json")
    script = ("import json, sys\nfrom vllm.lora.peft_helper import PEFTHelper\n"
              "for name, path in json.loads(sys.argv[1]).items():\n"
              "    h = PEFTHelper.from_dict(json.load(open(path)))\n"
              "    print(name, bool(h._validate_features() or h.bias != 'none'))\n")
    out = subprocess.run([str(VLLM_PYTHON), "-c", script, json.dumps(folders)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    refused = {line.split()[0]: line.split()[1] == "True" for line in out.stdout.splitlines()}
    assert refused == {name: name in REFUSED for name in folders}
