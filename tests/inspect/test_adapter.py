"""`inspect` on adapters saved by slimtune and by PEFT: norms and spectra against PEFT's own dW (the oracle)."""

import json

import pytest
import torch

import slimtune
from slimtune.files import AdapterFileError
from slimtune.inspect.adapter import inspect_adapter, table
from tests.conftest import tiny_llama
from tests.inspect.helpers import peft_adapter, peft_deltas, slimtune_adapter


def check_against_peft(stats, folder):
    deltas = peft_deltas(folder)
    assert sorted(m.name for m in stats.modules) == sorted(deltas)
    for m in stats.modules:
        dense = deltas[m.name]
        s = torch.linalg.svdvals(dense)
        assert m.shape == tuple(dense.shape)
        assert m.norm == pytest.approx(float(torch.linalg.matrix_norm(dense)), rel=1e-5)
        assert m.stable_rank == pytest.approx(float((s ** 2).sum() / s[0] ** 2), rel=1e-4)
        torch.testing.assert_close(torch.tensor(m.singular_values, dtype=torch.float64), s[:m.r], rtol=1e-4,
                                   atol=1e-7)
    assert [m.norm for m in stats.modules] == sorted((m.norm for m in stats.modules), reverse=True)


def test_slimtune_adapter_matches_peft_delta_weights(tmp_path):
    stats = inspect_adapter(slimtune_adapter(tmp_path / "a"))
    check_against_peft(stats, tmp_path / "a")
    assert (stats.method, stats.ranks, stats.targets) == ("lora", [4], "all-linear")
    assert stats.trainable_params == 2 * (3 * 4 * (64 + 128) + 2 * 4 * (64 + 64) + 2 * 4 * (64 + 32))
    assert stats.file_bytes == (tmp_path / "a" / "adapter_model.safetensors").stat().st_size
    assert stats.fingerprint.startswith("LlamaForCausalLM, 14 layers, sha256 ")


def test_peft_adapter_with_rank_and_alpha_patterns_matches_peft(tmp_path):
    """Per-module ranks and scales come from PEFT's rank_pattern / alpha_pattern, as PEFT applies them."""
    folder = peft_adapter(tmp_path / "p", rank_pattern={"q_proj": 2}, alpha_pattern={"down_proj": 32},
                          use_rslora=True)
    stats = inspect_adapter(folder)
    check_against_peft(stats, folder)
    assert stats.ranks == [2, 4] and stats.fingerprint is None
    assert {m.r for m in stats.modules if m.name.endswith("q_proj")} == {2}


def test_peft_dora_adapter_analyses_the_low_rank_part_and_keeps_the_magnitude_apart(tmp_path):
    folder = peft_adapter(tmp_path / "d", use_dora=True, target_modules=["q_proj", "v_proj"])
    stats = inspect_adapter(folder)
    assert stats.method == "dora" and len(stats.modules) == 4
    assert stats.fully_trained == []  # the magnitude vectors belong to their modules
    top = stats.modules[0]
    assert top.norm > 0 and top.r == 4


def test_json_lists_every_module_with_its_energy_ranks(tmp_path):
    stats = inspect_adapter(slimtune_adapter(tmp_path / "a", target_modules=["q_proj"], modules_to_save=["lm_head"]))
    d = json.loads(json.dumps(stats.as_dict()))
    assert [m["module"] for m in d["modules"]] == [m.name for m in stats.modules]
    assert set(d["modules"][0]["energy_ranks"]) == {"90%", "95%", "99%"}
    assert d["fully_trained"] == ["base_model.model.lm_head.weight"]
    assert d["total_norm"] == pytest.approx(sum(m.norm ** 2 for m in stats.modules) ** 0.5)


def test_table_is_sorted_and_names_the_columns(tmp_path):
    text = table(inspect_adapter(slimtune_adapter(tmp_path / "a")))
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("module"))
    assert "||dW||_F" in lines[header] and "r95" in lines[header]
    norms = [float(line.split()[3]) for line in lines[header + 1:]]
    assert len(norms) == 14 and norms == sorted(norms, reverse=True)


def test_bottleneck_adapter_reports_no_low_rank_update(tmp_path):
    model = tiny_llama()
    slimtune.inject(model, slimtune.BottleneckConfig(size=8, target_modules=("down_proj",)))
    slimtune.save_adapter(model, tmp_path / "b")
    stats = inspect_adapter(tmp_path / "b")
    assert stats.method == "bottleneck" and stats.modules == [] and stats.trainable_params > 0
    assert "not low-rank weight updates" in table(stats)


def test_a_pickled_adapter_is_refused_by_name(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(AdapterFileError, match="adapter_model.bin, a pickle file"):
        inspect_adapter(tmp_path / "x")
