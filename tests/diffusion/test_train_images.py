"""`slimtune train` with data.format: images: a tiny diffusers UNet folder + a tiny captioned image folder, through
the CLI; the adapter loads in diffusers with outputs equal to slimtune's; exact resume; named errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import slimtune
from slimtune.diffusion.images import load_images, save_image_folder
from slimtune.diffusion.unet_folder import PROMPTS_FILE, load_unet_folder, save_prompts
from slimtune.train.config import RunConfigError, run_config_from_dict
from slimtune.train.model import ModelLoadError
from slimtune.train.run import RunError, train
from tests.diffusion.resume_check import assert_resume_is_exact

ROOT = Path(__file__).resolve().parents[2]
CAPTIONS = ["red square", "blue ring"]
UNET = dict(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=12, attention_head_dim=4, norm_num_groups=4)


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("unet") / "unet"
    UNet2DConditionModel(**UNET).save_pretrained(folder)
    save_prompts(folder, torch.randn(2, 3, 12), CAPTIONS)
    return folder


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """6 RGB 16x16 images: 3 red squares, 3 blue rings, at shifted places."""
    g = torch.Generator().manual_seed(1)
    images = -torch.ones(6, 3, 16, 16)
    for i in range(6):
        x, y = (int(v) for v in torch.randint(2, 8, (2,), generator=g))
        if i % 2 == 0:
            images[i, 0, y:y + 6, x:x + 6] = 1
        else:
            images[i, 2, y:y + 6, x:x + 6] = 1
            images[i, 2, y + 2:y + 4, x + 2:x + 4] = -1
    return save_image_folder(tmp_path_factory.mktemp("img") / "images", images, [CAPTIONS[i % 2] for i in range(6)])


def run_dict(unet_dir, image_dir, out, **train) -> dict:
    return {"model": {"name": str(unet_dir)},
            "adapter": {"method": "lora", "r": 4, "alpha": 8, "target_modules": ["to_q", "to_k", "to_v", "to_out.0",
                                                                                  "conv1", "conv2"]},
            "data": {"format": "images", "train": str(image_dir), "resolution": 16, "channels": 3},
            "train": {"max_steps": 6, "batch_size": 3, "lr": 1e-2, "scheduler": "constant", "warmup": 0,
                      "log_every": 1, "save_every": 3, "eval_every": 3, **train},
            "output_dir": str(out)}


def unet_outputs(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    x, states = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 3, 12, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 700]), encoder_hidden_states=states).sample


def test_cli_trains_and_diffusers_loads_the_adapter_with_equal_outputs(unet_dir, image_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(run_dict(unet_dir, image_dir, tmp_path / "out")))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "slimtune", "train", str(cfg)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    file = out / "adapter" / "pytorch_lora_weights.safetensors"
    assert file.is_file() and (out / "samples.png").is_file() and (out / "checkpoints" / "step-6").is_dir()
    assert "pipe.load_lora_weights" in proc.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    summary = records[-1]
    assert summary["event"] == "summary" and summary["after"]["noise_loss"] < summary["before"]["noise_loss"]
    assert 0 <= summary["after"]["copy_fraction"] <= 1
    assert all(k.startswith("unet.") for k in load_file(str(file)))

    ours = UNet2DConditionModel.from_pretrained(unet_dir).eval()
    base = unet_outputs(ours)
    slimtune.load_adapter(ours, out / "adapter")
    theirs = UNet2DConditionModel.from_pretrained(unet_dir).eval()
    theirs.load_lora_adapter(str(out / "adapter"), prefix="unet",  # diffusers + PEFT: the oracle
                            weight_name="pytorch_lora_weights.safetensors")
    torch.testing.assert_close(unet_outputs(ours), unet_outputs(theirs), atol=1e-5, rtol=1e-5)
    assert (unet_outputs(ours) - base).abs().max() > 1e-4  # the adapter trained: it changes outputs


def test_resume_from_a_checkpoint_gives_the_same_adapter_and_metrics(unet_dir, image_dir, tmp_path):
    cfg = run_config_from_dict(run_dict(unet_dir, image_dir, tmp_path / "out", snr_gamma=5.0))
    assert_resume_is_exact(cfg, tmp_path / "out")


@pytest.mark.parametrize("data, train_, quantize, method, issue", [
    ({"format": "images", "train": "rows.jsonl"}, {}, "none", "lora",
     "data.train='rows.jsonl': data.format: images reads a folder"),
    ({"format": "images", "train": "imgs", "eval": "e.jsonl"}, {}, "none", "lora",
     "data.eval='e.jsonl': not read with data.format: images"),
    ({"format": "images", "train": "imgs", "channels": 2}, {}, "none", "lora",
     "data.channels=2: must be 1 (grey) or 3 (RGB)"),
    ({"format": "images", "train": "imgs", "resolution": 0}, {}, "none", "lora", "data.resolution=0: must be"),
    ({"format": "images", "train": "imgs"}, {}, "none", "bottleneck",
     "adapter.method='bottleneck': data.format: images writes diffusers' LoRA file"),
    ({"format": "images", "train": "imgs"}, {}, "nf4", "lora", "quantize='nf4': not supported with data.format"),
    ({"format": "images", "train": "imgs"}, {"batch_size": "auto"}, "none", "lora", "train.batch_size='auto'"),
    ({"format": "images", "train": "imgs"}, {"snr_gamma": 0}, "none", "lora", "train.snr_gamma=0: must be"),
    ({"format": "images", "train": "imgs"}, {"prediction_type": "sample"}, "none", "lora",
     "train.prediction_type='sample': must be one of epsilon, v_prediction"),
    ({"format": "chat"}, {"snr_gamma": 5}, "none", "lora", "train.snr_gamma=5.0: only read with data.format: images"),
])
def test_config_errors_are_named(data, train_, quantize, method, issue):
    d = {"data": data, "train": train_, "quantize": quantize, "adapter": {"method": method}}
    with pytest.raises(RunConfigError) as err:
        run_config_from_dict(d)
    assert any(i.startswith(issue) for i in err.value.issues), err.value.issues


def test_missing_image_folder_is_named_by_the_file_check(tmp_path):
    with pytest.raises(RunConfigError) as err:
        run_config_from_dict({"data": {"format": "images", "train": str(tmp_path / "nope")}}, check_files=True)
    assert any(i.startswith(f"data.train={str(tmp_path / 'nope')!r}: no such folder") for i in err.value.issues)


def test_run_errors_are_named_and_write_nothing(unet_dir, image_dir, tmp_path):
    def refused(error, match, **changes):
        d = run_dict(unet_dir, image_dir, tmp_path / "out")
        for key, value in changes.items():
            section, field = key.split("__")
            d[section][field] = value
        with pytest.raises(error, match=match):
            train(run_config_from_dict(d), log=lambda s: None)
        assert not (tmp_path / "out").exists()

    refused(RunError, r"data.channels=1: the UNet in .* takes 3 channels", data__channels=1)
    refused(RunError, r"data.resolution=15: must be a multiple of 2", data__resolution=15)
    refused(RunError, r"adapter.target_modules=.*q_proj", adapter__target_modules=["q_proj"])
    other = tmp_path / "other"
    save_image_folder(other, -torch.ones(2, 3, 16, 16), ["red square", "green star"])
    refused(ModelLoadError, r"caption 'green star' has no prompt in the model's prompts.safetensors",
            data__train=str(other))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_bytes(b"not a png")
    (tmp_path / "broken" / "a.txt").write_text("red square")
    refused(RunError, r"a.png: not a readable image", data__train=str(tmp_path / "broken"))


def test_unet_folder_problems_are_named(unet_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="no readable config.json"):
        load_unet_folder(tmp_path)
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "config.json").write_text(json.dumps({"_class_name": "LlamaForCausalLM"}))
    with pytest.raises(ModelLoadError, match="config.json is a 'LlamaForCausalLM'"):
        load_unet_folder(tmp_path / "lm")
    bare = tmp_path / "bare"
    shutil.copytree(unet_dir, bare)
    (bare / PROMPTS_FILE).unlink()
    with pytest.raises(ModelLoadError, match=f"no {PROMPTS_FILE}"):
        load_unet_folder(bare)
    save_prompts(bare, torch.randn(2, 3, 8), CAPTIONS)  # width 8, the UNet's cross-attention takes 12
    with pytest.raises(ModelLoadError, match=r"table \(2, 3, 8\) must be \(n captions, tokens, 12\)"):
        load_unet_folder(bare)
    (bare / PROMPTS_FILE).write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="not a prompt table"):
        load_unet_folder(bare)


def test_saved_image_folder_reads_back(tmp_path):
    images = torch.rand(3, 1, 8, 8) * 2 - 1
    folder = save_image_folder(tmp_path / "f", images, ["a", "b", "c"])
    back = load_images(folder, 8, channels=1)
    assert back.captions == ("a", "b", "c")
    assert (back.images - images).abs().max() <= 1 / 127.5  # 8-bit PNG rounding
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]  # no temporary folder left


def test_cli_bad_image_is_one_error_line(unet_dir, tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(b"x")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(run_dict(unet_dir, tmp_path / "imgs", tmp_path / "out")))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "slimtune", "train", str(cfg)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "a.png: no caption" in errors[0], proc.stderr


def test_the_shipped_config_trains_on_a_unet_folder(unet_dir, image_dir, tmp_path, monkeypatch):
    """configs/train/diffusion.yaml as shipped (its model and images are the digits recipe's): on the tiny UNet."""
    from slimtune.train.config import load_run_config

    monkeypatch.chdir(tmp_path)
    with pytest.raises(RunConfigError, match="model.name='runs/digits/base': data.format: images needs a diffusers"):
        load_run_config(ROOT / "configs" / "train" / "diffusion.yaml", check_files=True)
    cfg = load_run_config(ROOT / "configs" / "train" / "diffusion.yaml",
                          [f"model.name={unet_dir}", f"data.train={image_dir}", "data.channels=3",
                           "train.max_steps=2", "train.batch_size=2", "output_dir=out"], check_files=True)
    result = train(cfg, log=lambda s: None)
    assert result.steps == 2 and (tmp_path / "out" / "adapter" / "pytorch_lora_weights.safetensors").is_file()


def test_grad_checkpointing_trains_the_same_adapter(unet_dir, image_dir, tmp_path):
    """train.grad_checkpointing switches on diffusers' own recomputation: same gradients, so the same adapter."""
    files = []
    for flag in (False, True):
        d = run_dict(unet_dir, image_dir, tmp_path / str(flag), max_steps=3, save_every=None, eval_every=None,
                     grad_checkpointing=flag)
        result = train(run_config_from_dict(d), log=lambda s: None)
        files.append(load_file(str(result.adapter_dir / "pytorch_lora_weights.safetensors")))
    for k in files[0]:
        torch.testing.assert_close(files[1][k], files[0][k], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("model_dtype, precision, method", [("float32", "bf16", "lora"), ("bfloat16", "fp32", "lora"),
                                                             ("float32", "fp32", "dora")],
                         ids=["autocast-bf16", "bf16-base", "dora-with-conv-targets"])
def test_bf16_and_dora_runs_train_and_their_adapter_loads_in_diffusers(unet_dir, image_dir, tmp_path, model_dtype,
                                                                        precision, method):
    """The two bf16 paths a user takes (autocast on an fp32 UNet; a bf16 UNet with fp32 adapters) and a DoRA run
    (attention and Conv2d targets). The loss stays finite, the fixed-noise loss falls, and diffusers loads the
    adapter with outputs equal to slimtune's UNet carrying it (compared in fp32)."""
    from diffusers import UNet2DConditionModel

    cfg = run_dict(unet_dir, image_dir, tmp_path / "out", precision=precision)
    cfg["model"]["dtype"] = model_dtype
    cfg["adapter"]["method"] = method
    train(run_config_from_dict(cfg), log=lambda s: None)
    out = tmp_path / "out"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records if "loss" in r)
    summary = records[-1]
    assert summary["event"] == "summary" and summary["after"]["noise_loss"] < summary["before"]["noise_loss"]
    keys = load_file(str(out / "adapter" / "pytorch_lora_weights.safetensors"))
    magnitudes = [k for k in keys if "lora_magnitude_vector" in k]
    assert bool(magnitudes) == (method == "dora") and (method != "dora" or any("conv1" in k for k in magnitudes))
    ours = UNet2DConditionModel.from_pretrained(unet_dir).eval()
    slimtune.load_adapter(ours, out / "adapter")
    theirs = UNet2DConditionModel.from_pretrained(unet_dir).eval()
    theirs.load_lora_adapter(str(out / "adapter"), prefix="unet", weight_name="pytorch_lora_weights.safetensors")
    torch.testing.assert_close(unet_outputs(ours), unet_outputs(theirs), atol=1e-5, rtol=1e-5)


def test_pissa_init_is_refused_before_anything_loads(unet_dir, image_dir, tmp_path, monkeypatch):
    from diffusers import UNet2DConditionModel

    def no_load(*a, **k):
        raise AssertionError("the UNet loaded before the refusal")

    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", no_load)
    cfg = run_dict(unet_dir, image_dir, tmp_path / "out")
    cfg["adapter"]["init"] = "pissa"
    with pytest.raises(RunError, match="adapter.init='pissa': diffusers' LoRA file cannot hold"):
        train(run_config_from_dict(cfg), log=lambda s: None)
    assert not (tmp_path / "out").exists()
