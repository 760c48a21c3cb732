"""`slimtune train` on a pipeline folder with `train.text_encoder: true`: a LoRA on the CLIP text encoder as well,
as diffusers' train_dreambooth_lora.py --train_text_encoder. Oracle: StableDiffusionPipeline.load_lora_weights
(diffusers + PEFT) reading the one adapter file; the tiny pipeline is test_train_pipeline's."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

import slimtune
from slimtune.train.config import run_config_from_dict
from slimtune.train.run import RunError, train

from .conftest import tiny_unet
from .resume_check import assert_resume_is_exact
from .test_train_pipeline import CAPTIONS, cli, image_dir, pipe_dir, run_dict, unet_outputs  # noqa: F401

TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def sd_pipeline(folder):
    from diffusers import StableDiffusionPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return StableDiffusionPipeline.from_pretrained(folder)


def test_cli_trains_both_loras_and_diffusers_loads_them_with_equal_outputs(pipe_dir, image_dir, tmp_path):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(run_dict(pipe_dir, image_dir, tmp_path / "out", text_encoder=True)))
    proc = cli(cfg, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "text encoder:" in proc.stdout  # the second injection is reported
    out = tmp_path / "out"
    saved = load_file(str(out / "adapter" / "pytorch_lora_weights.safetensors"))
    te_keys = [k for k in saved if k.startswith("text_encoder.")]
    assert {k.split(".")[0] for k in saved} == {"unet", "text_encoder"}
    # 2 layers x 4 projections x (A, B), every projection CLIP's attention has
    assert len(te_keys) == 16 and all(any(f".{t}." in k for t in TE_TARGETS) for k in te_keys)
    assert all(saved[k].abs().max() > 0 for k in te_keys if "lora_B" in k)  # B starts at zero: it trained

    ours = SimpleNamespace(unet=UNet2DConditionModel.from_pretrained(pipe_dir, subfolder="unet").eval(),
                           text_encoder=CLIPTextModel.from_pretrained(pipe_dir, subfolder="text_encoder").eval())
    slimtune.diffusion.load_lora_weights(ours, out / "adapter")
    trained = load_file(str(out / "checkpoints" / "step-6" / "trainable.safetensors"))  # the run's own tensors
    for part in ("unet", "text_encoder"):
        live = {n: p for n, p in getattr(ours, part).named_parameters() if p.requires_grad}
        assert live and all(torch.equal(trained[f"{part}.{n}"], p.detach()) for n, p in live.items()), part
    pipe = sd_pipeline(pipe_dir)  # diffusers + PEFT: the oracle
    base_te = pipe.text_encoder
    ids = pipe.tokenizer(list(dict.fromkeys(CAPTIONS)), padding="max_length", max_length=24, truncation=True,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        before = base_te(ids)[0].clone()
    pipe.load_lora_weights(str(out / "adapter"))
    with torch.no_grad():
        theirs, mine = pipe.text_encoder(ids)[0], ours.text_encoder(ids)[0]
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
    assert (mine - before).abs().max() > 1e-4  # the text-encoder LoRA changes what the UNet is conditioned on
    torch.testing.assert_close(unet_outputs(ours.unet), unet_outputs(pipe.unet), atol=1e-5, rtol=1e-5)
    expect = pipe.encode_prompt(CAPTIONS[2], "cpu", 1, False)[0][0]  # the pipeline's own path, truncated caption
    torch.testing.assert_close(mine[2], expect, atol=1e-5, rtol=1e-5)


def test_resume_with_the_text_encoder_is_exact(pipe_dir, image_dir, tmp_path):
    cfg = run_config_from_dict(run_dict(pipe_dir, image_dir, tmp_path / "out", text_encoder=True, snr_gamma=5.0))
    assert_resume_is_exact(cfg, tmp_path / "out")
    step = tmp_path / "out" / "checkpoints" / "step-6"
    trainable = load_file(str(step / "trainable.safetensors"))
    assert sum(k.startswith("text_encoder.") for k in trainable) == 16  # the checkpoint holds its LoRA too
    stepped = {k.split(".")[1] for k in load_file(str(step / "optimizer.safetensors")) if k.startswith("state.")}
    assert len(stepped) == len(trainable)  # AdamW holds a state for every trainable tensor: both parts step


def test_a_unet_folder_is_refused_before_anything_loads(image_dir, tmp_path, monkeypatch):
    import diffusers

    folder = tmp_path / "unet"
    tiny_unet().save_pretrained(folder)
    d = run_dict(folder, image_dir, tmp_path / "out", text_encoder=True)
    monkeypatch.setattr(diffusers.UNet2DConditionModel, "from_pretrained", None)  # loading it would fail loudly
    with pytest.raises(RunError, match=r"train.text_encoder=True: model.name=.* is a UNet folder, which has no "
                                       r"text encoder"):
        train(run_config_from_dict(d), log=lambda s: None)
    assert not (tmp_path / "out").exists()


def test_validate_accepts_it_with_images_and_refuses_it_with_another_format(pipe_dir, image_dir, tmp_path):
    from slimtune.cli import app

    runner = CliRunner()
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run_dict(pipe_dir, image_dir, tmp_path / "out", text_encoder=True)))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0 and f"{path}: valid" in result.output, result.output
    assert run_config_from_dict(yaml.safe_load(path.read_text())).train.text_encoder is True
    result = runner.invoke(app, ["validate", str(path), "train.text_encoder=maybe"])
    assert result.exit_code == 2 and "train.text_encoder='maybe'" in result.output, result.output
    chat = {"model": {"name": "smollm2-135m"}, "train": {"text_encoder": True}}
    path.write_text(yaml.safe_dump(chat))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    assert "train.text_encoder=True: only read with data.format: images; remove it" in result.output


@pytest.mark.parametrize("model_dtype, precision, method", [("float32", "bf16", "lora"), ("bfloat16", "fp32", "lora"),
                                                             ("float32", "fp32", "dora")],
                         ids=["autocast-bf16", "bf16-base", "dora"])
def test_bf16_and_dora_text_encoder_runs_train_and_diffusers_loads_them(pipe_dir, image_dir, tmp_path, model_dtype,
                                                                        precision, method):
    """The bf16 paths a user takes (autocast on fp32 parts; bf16 parts with fp32 adapters) and DoRA (the text
    encoder's LoRA takes the UNet adapter's method): the loss stays finite, the text encoder's adapter trains,
    and diffusers' text encoder carrying it gives slimtune's outputs (compared in fp32)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    cfg = run_dict(pipe_dir, image_dir, tmp_path / "out", text_encoder=True, precision=precision)
    cfg["model"]["dtype"] = model_dtype
    cfg["adapter"]["method"] = method
    result = train(run_config_from_dict(cfg), log=lambda s: None)
    assert all(torch.isfinite(torch.tensor(v)) for v in (*result.before.values(), *result.after.values()))
    saved = load_file(str(result.adapter_dir / "pytorch_lora_weights.safetensors"))
    te_b = [k for k in saved if k.startswith("text_encoder.") and "lora_B" in k]
    assert len(te_b) == 8 and all(saved[k].abs().max() > 0 for k in te_b)
    magnitudes = [k for k in saved if k.startswith("text_encoder.") and "lora_magnitude_vector" in k]
    assert len(magnitudes) == (8 if method == "dora" else 0)
    ours = SimpleNamespace(unet=UNet2DConditionModel.from_pretrained(pipe_dir, subfolder="unet").eval(),
                           text_encoder=CLIPTextModel.from_pretrained(pipe_dir, subfolder="text_encoder").eval())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # bf16-base: trained on bf16 weights, compared in fp32
        slimtune.diffusion.load_lora_weights(ours, result.adapter_dir)
    ids = torch.tensor([[0, 5, 9, 17, 1, 1], [0, 30, 2, 1, 1, 1]])
    with torch.no_grad():
        torch.testing.assert_close(ours.text_encoder(ids)[0], oracle_text_encoder(pipe_dir, result.adapter_dir,
                                                                                  method)(ids)[0],
                                   atol=1e-5, rtol=1e-5)


def oracle_text_encoder(pipe_dir, adapter_dir, method):
    """The text encoder with the file's LoRA as diffusers loads it (``pipe.load_lora_weights``); for DoRA, as
    PEFT loads it (``inject_adapter_in_model`` + ``set_peft_model_state_dict``, what diffusers does for the
    UNet): diffusers 0.42's text-encoder path through transformers 5 expects ``lora_magnitude_vector.weight``
    while PEFT's (and diffusers' DreamBooth script's) saved key is ``lora_magnitude_vector``, so it leaves
    the magnitudes at their initial values (a LOAD REPORT lists them MISSING)."""
    if method != "dora":
        pipe = sd_pipeline(pipe_dir)
        pipe.load_lora_weights(str(adapter_dir))
        return pipe.text_encoder
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from transformers import CLIPTextModel

    te = CLIPTextModel.from_pretrained(pipe_dir, subfolder="text_encoder").eval()
    # diffusers' files name CLIP's modules under text_model. (transformers 4's layout; 5 has them at the top)
    state = {k.removeprefix("text_encoder.").removeprefix("text_model."): v for k, v in
             load_file(str(adapter_dir / "pytorch_lora_weights.safetensors")).items() if k.startswith("text_encoder.")}
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=list(TE_TARGETS), use_dora=True), te)
    result = set_peft_model_state_dict(te, state)
    assert not result.unexpected_keys, result.unexpected_keys  # every tensor of the file found its place
    return te
