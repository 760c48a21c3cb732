"""`slimtune estimate` and `slimtune plan` through a typer app built here with register()."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from slimtune.memory.commands import register
from slimtune.memory.plan import plan
from slimtune.memory.presets import gpu_bytes

app = typer.Typer()
register(app)


@app.callback()
def _root() -> None:
    """A group, so that subcommands are addressed by name as in slimtune's app."""


def run(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def as_json(*args: str) -> dict:
    return json.loads(run("estimate", *args, "--json"))


SEED_7B = ("--params", "7e9", "--weight-dtype", "fp16", "--grad-dtype", "fp16")


def test_seed_000_amp_84_gb():
    out = run("estimate", *SEED_7B, "--optim-dtype", "fp32")
    assert "14.00 GB" in out and "56.00 GB" in out and "84.00 GB" in out
    assert "7,000,000,000 trainable x 8 B (AdamW: 2 moments x 4 B fp32)" in out
    assert as_json(*SEED_7B, "--optim-dtype", "fp32") == {
        "weights": 14_000_000_000, "gradients": 14_000_000_000, "optimizer": 56_000_000_000,
        "activations": 0, "total": 84_000_000_000}


def test_seed_fp16_moments_56_gb_and_fp32_112_gb():
    assert as_json(*SEED_7B, "--optim-dtype", "fp16")["total"] == 56_000_000_000
    d = as_json("--params", "7e9", "--weight-dtype", "fp32", "--grad-dtype", "fp32", "--optim-dtype", "fp32")
    assert (d["weights"], d["gradients"], d["optimizer"], d["total"]) == (28e9, 28e9, 56e9, 112e9)


def test_seed_001_master_weights_128_gb():
    d = as_json("--params", "8e9", "--weight-dtype", "fp16", "--grad-dtype", "fp16", "--optim-dtype", "fp32",
                "--master-weights")
    assert (d["weights"], d["gradients"], d["optimizer"], d["total"]) == (16e9, 16e9, 96e9, 128e9)
    assert "+ 4 B fp32 master copy" in run("estimate", "--params", "8e9", "--master-weights")


def test_lora_table_shows_65536_and_256x():
    out = run("estimate", "--model", "llama-2-7b", "--method", "lora", "--targets", "q_proj,v_proj")
    assert "4096x4096: 65,536 instead of 16,777,216 (256x fewer) x 32" in out
    assert "4,194,304 trainable" in out


def test_nf4_70b_weights():
    d = as_json("--params", "70e9", "--method", "qlora", "--trainable", "0")
    assert 36.0e9 < d["weights"] < 36.2e9
    assert "x 4.127 bits (nf4, double quant)" in run("estimate", "--model", "llama-2-70b", "--method", "qlora")


def test_compare_side_by_side_and_plot(tmp_path):
    out = run("estimate", "--model", "llama-2-7b", "--compare", "full,lora,qlora", "--weight-dtype", "fp16",
              "--plot", str(tmp_path / "bars.png"))
    header = out.splitlines()[1].split()
    assert header == ["full", "lora", "qlora", "(nf4)"]
    assert (tmp_path / "bars.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    d = json.loads(run("estimate", "--model", "llama-2-7b", "--compare", "full,lora", "--json"))
    assert set(d) == {"full", "lora"} and set(d["lora"]) == {"weights", "gradients", "optimizer", "activations",
                                                            "total"}


def test_config_json_folder(tmp_path):
    from .conftest import TINY

    (tmp_path / "config.json").write_text(json.dumps(TINY["llama"]))
    d = as_json("--model", str(tmp_path), "--batch", "2", "--seq", "32", "--grad-checkpointing")
    assert d["activations"] > 0 and d["weights"] == 90_432 * 2


@pytest.mark.parametrize("args, message", [
    (("--params", "7e9", "--model", "gpt2"), "exactly one of --model"),
    (("--params", "7e9", "--method", "lora"), "--trainable N"),
    (("--model", "llama-2-7b", "--weight-dtype", "fp8"), "precision.weight_dtype='fp8'"),
    (("--model", "llama-2-7b", "--method", "lora", "--targets", "qproj"), "matches no linear layer"),
])
def test_errors_exit_2_with_message(args, message):
    result = CliRunner().invoke(app, ["estimate", *args])
    assert result.exit_code == 2 and message in result.output


def refused(*args: str) -> str:
    """The command's one output line, checking it exited 2 without an exception escaping."""
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), (result.output, result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    return lines[0]


CANONICAL = "must be one of full, freeze, lora, qlora, dora, bottleneck, prompt"


@pytest.mark.parametrize("args, needles", [
    (("--model", "llama-2-7b", "--method", "lora2"), ("method='lora2'", CANONICAL)),
    (("--model", "llama-2-7b", "--compare", "full,foo"), ("method='foo'", CANONICAL)),
    (("--model", "llama-2-7b", "--method", "lora", "--compare", "full,qlora"), ("--method='lora' with --compare",)),
    (("--model", "llama-2-7b", "--rank", "16"),
     ("method.rank=16: not used by method full; only by lora, qlora, dora",)),
    (("--model", "llama-2-7b", "--method", "lora", "--prompt-tokens", "5"), ("method.prompt_tokens=5", "prompt")),
    (("--model", "llama-2-7b", "--compare", "lora,qlora", "--adapter-dim", "8"), ("method.adapter_dim=8",)),
    (("--model", "llama-2-7b", "--method", "bottleneck", "--trainable-layers", "3"), ("method.trainable_layers=3",)),
    (("--model", "llama-2-7b", "--method", "full", "--targets", "q_proj"), ("method.targets=('q_proj',)",)),
    (("--params", "7e9", "--trainable", "5"), ("trainable=5 with method full",)),
    (("--model", "llama-2-7b", "--measure", "--compare", "full,lora"), ("--measure with --compare",)),
    (("--model", "llama-2-7b", "--measure", "--json"), ("--measure with --json",)),
    (("--params", "7e9", "--measure"), ("--measure with --params",)),
    (("--model", "llama-2-7b", "--method", "lora", "--targets", ","), ("--targets=','",)),
    (("--params", "-1"), ("params=-1.0: must be a positive whole number",)),
])
def test_estimate_bad_flags_are_one_line_and_exit_2(args, needles):
    line = refused("estimate", *args)
    assert all(n in line for n in needles), line


def test_flags_used_by_one_compared_method_are_accepted():
    d = as_json("--model", "llama-2-7b", "--compare", "full,lora", "--rank", "4")
    assert set(d) == {"full", "lora"}


@pytest.mark.parametrize("text, needle", [
    ("{not json", "not a readable JSON config"),
    ("[1, 2]", "must hold a JSON object"),
    ('{"model_type": "llama", "hidden_size": 64}', "missing num_attention_heads, intermediate_size"),
    ('{"model_type": ["llama"]}', "model_type=['llama']: must be one of"),
])
def test_estimate_bad_config_json_is_named(tmp_path, text, needle):
    path = tmp_path / "config.json"
    path.write_text(text)
    assert needle in refused("estimate", "--model", str(path))


@pytest.mark.parametrize("args, needle", [
    (("--gpu", "big", "--model", "llama-2-7b"), "gpu='big': must be a size"),
    (("--gpu", "24GB", "--model", "nope"), "model='nope': not a preset"),
    (("--gpu", "24GB", "--model", "llama-2-7b", "--targets", "qproj"), "matches no linear layer"),
    (("--gpu", "24GB", "--model", "llama-2-7b", "--targets", " , "), "--targets=' , '"),
])
def test_plan_bad_flags_are_one_line_and_exit_2(args, needle):
    assert needle in refused("plan", *args)


@pytest.mark.parametrize("alias, canonical", [("adapter", "bottleneck"), ("prompt-tuning", "prompt"),
                                              ("prompt_tuning", "prompt"), ("DoRA", "dora")])
def test_old_method_spellings_are_aliases_reported_canonically(alias, canonical):
    assert as_json("--model", "llama-2-7b", "--method", alias) == as_json("--model", "llama-2-7b", "--method",
                                                                             canonical)
    assert f"llama-2-7b: {canonical}," in run("estimate", "--model", "llama-2-7b", "--method", alias)
    d = json.loads(run("estimate", "--model", "llama-2-7b", "--compare", f"full,{alias}", "--json"))
    assert set(d) == {"full", canonical}


def test_measure_flag_prints_estimate_vs_measured(tmp_path):
    pytest.importorskip("torch")
    from .conftest import TINY

    (tmp_path / "config.json").write_text(json.dumps(TINY["gpt2"]))
    out = run("estimate", "--model", str(tmp_path / "config.json"), "--method", "lora", "--batch", "2", "--seq",
              "16", "--measure")
    assert "measured on cpu" in out and "activations" in out.split("measured on cpu")[1]


METHOD_FLAGS = {"dora": ("--rank", "4"), "bottleneck": ("--adapter-dim", "16"), "prompt": ("--prompt-tokens", "8")}


@pytest.mark.parametrize("family, method", [("llama", "dora"), ("gpt2", "dora"), ("bert", "bottleneck"),
                                            ("llama", "prompt"), ("gpt2", "bottleneck"), ("bert", "prompt")])
def test_measure_flag_for_dora_bottleneck_prompt(tmp_path, family, method):
    pytest.importorskip("torch")
    from .conftest import TINY

    (tmp_path / "config.json").write_text(json.dumps(TINY[family]))
    out = run("estimate", "--model", str(tmp_path / "config.json"), "--method", method, "--batch", "2", "--seq",
              "16", *METHOD_FLAGS[method], "--measure")
    rows = out.split("measured on cpu")[1].splitlines()[2:7]
    assert [r.split()[0] for r in rows] == ["weights", "gradients", "optimizer", "activations", "total"]
    assert all(abs(float(r.split()[-1].rstrip("%"))) <= 5.0 for r in rows), out


def test_plan_24gb_llama_3_8b():
    out = run("plan", "--gpu", "24GB", "--model", "llama-3-8b", "--seq", "2048")
    assert "headroom" in out
    p = plan("llama-3-8b", gpu_bytes("24GB"), 2048)
    methods = {f.recipe.method for f in p.fits}
    assert "full" not in methods and {"lora", "qlora"} <= methods
    assert all(f.headroom >= 0 for f in p.fits)


def test_plan_80gb_fits_more():
    p24 = plan("llama-3-8b", gpu_bytes("rtx-4090"), 2048)
    p80 = plan("llama-3-8b", gpu_bytes("a100-80gb"), 2048)
    assert len(p80.fits) > len(p24.fits) and p80.fits[0].recipe.method == "full"
    assert max(f.batch for f in p80.fits) > max(f.batch for f in p24.fits)


def test_plan_says_plainly_when_nothing_fits():
    out = run("plan", "--gpu", "t4", "--model", "llama-2-70b", "--seq", "4096")
    assert "Nothing fits." in out and "more than this card has" in out


def test_gpu_sizes():
    assert gpu_bytes("24GB") == 24e9 and gpu_bytes("24GiB") == 24 * 2**30 == gpu_bytes("rtx-4090")
    with pytest.raises(ValueError, match="gpu='big': must be a size"):
        gpu_bytes("big")


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_adapter_dtype_flag_counts_adapters_in_fp32_or_the_base_dtype(method):
    # llama-2-7b, q and v at rank 8: 4,194,304 adapter parameters, fp32 by default (as slimtune creates them)
    fp32 = as_json("--model", "llama-2-7b", "--method", method)
    base = as_json("--model", "llama-2-7b", "--method", method, "--adapter-dtype", "base")
    assert fp32["gradients"] == 4_194_304 * 4 and base["gradients"] == 4_194_304 * 2
    assert fp32["weights"] - base["weights"] == 4_194_304 * 2
    both = json.loads(run("estimate", "--model", "llama-2-7b", "--compare", "lora,qlora", "--adapter-dtype", "base",
                          "--json"))
    assert both["qlora"]["gradients"] == 4_194_304 * 2  # compare keeps the option for qlora too
    result = CliRunner().invoke(app, ["estimate", "--model", "llama-2-7b", "--adapter-dtype", "bf16"])
    assert result.exit_code == 2 and "precision.adapter_dtype='bf16': must be one of float32, base" in result.output
