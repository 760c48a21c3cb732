"""`slimtune train` with data.format: images on a Stable-Diffusion-style pipeline folder (tiny random parts saved
with save_pretrained): free-text captions through its CLIP tokenizer + text encoder, images through its VAE.
Oracles: diffusers' StableDiffusionPipeline (encode_prompt, load_lora_weights), AutoencoderKL.encode/decode."""

from __future__ import annotations

import json
import os
import shutil
import string
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import slimtune
from slimtune.diffusion.images import load_images, save_image_folder
from slimtune.diffusion.pipeline_folder import decode, encode_latents, load_pipeline, read_layout
from slimtune.train.config import run_config_from_dict
from slimtune.train.model import ModelLoadError
from slimtune.train.run import RunError, train

from .conftest import UNET_CONFIG
from tests.diffusion.resume_check import assert_resume_is_exact

ROOT = Path(__file__).resolve().parents[2]
MAX_TOKENS = 24  # the tiny tokenizer's model_max_length: one character per token (no merges)
LONG = "a big blue ring drawn on a black ground"  # 41 tokens with bos/eos: truncated to 24
CAPTIONS = ["red square", "a small red square", LONG, "blue ring", "red square", LONG]


def tiny_tokenizer():
    """A CLIP tokenizer over lowercase letters (no merges: a token per character, `</w>` ends a word)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        vocab |= {c + suffix: len(vocab) + i for i, c in enumerate(string.ascii_lowercase)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=MAX_TOKENS)


def tiny_parts():
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=60, hidden_size=12, intermediate_size=24, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=32, bos_token_id=0,
                                      eos_token_id=1, pad_token_id=1))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                        norm_num_groups=4, sample_size=16)  # 16x16 images -> 8x8 latents
    sched = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                          steps_offset=1)  # Stable Diffusion 1.5's scheduler folder (read as DDPM, as diffusers does)
    return dict(vae=vae, text_encoder=te, tokenizer=tiny_tokenizer(), unet=UNet2DConditionModel(**UNET_CONFIG),
                scheduler=sched)


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    folder = tmp_path_factory.mktemp("pipe") / "sd"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        pipe = StableDiffusionPipeline(**tiny_parts(), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """6 RGB 16x16 images with free-text captions: red squares and blue rings at shifted places."""
    g = torch.Generator().manual_seed(1)
    images = -torch.ones(6, 3, 16, 16)
    for i, caption in enumerate(CAPTIONS):
        x, y = (int(v) for v in torch.randint(2, 8, (2,), generator=g))
        images[i, 0 if "red" in caption else 2, y:y + 6, x:x + 6] = 1
    return save_image_folder(tmp_path_factory.mktemp("img") / "images", images, CAPTIONS)


def run_dict(model, images, out, **train_) -> dict:
    return {"model": {"name": str(model)},
            "adapter": {"method": "lora", "r": 4, "alpha": 8, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]},
            "data": {"format": "images", "train": str(images), "resolution": 16, "channels": 3},
            "train": {"max_steps": 6, "batch_size": 3, "lr": 1e-2, "scheduler": "constant", "warmup": 0,
                      "log_every": 1, "save_every": 3, "eval_every": 3, **train_},
            "output_dir": str(out)}


def unet_outputs(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    x, states = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 12, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 700]), encoder_hidden_states=states).sample


def cli(cfg: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "slimtune", "train", str(cfg)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_trains_on_a_pipeline_folder_and_the_pipeline_loads_the_adapter(pipe_dir, image_dir, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(run_dict(pipe_dir, image_dir, tmp_path / "out")))
    proc = cli(cfg, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("longer than the tokenizer's 24 tokens") == 1, proc.stdout  # said once, not an error
    assert "note: 1 caption(s) are longer" in proc.stdout  # LONG twice: one distinct caption, counted once
    assert "latents (4, 8, 8)" in proc.stdout  # 16x16 images through the VAE's 2x down-sampling
    out = tmp_path / "out"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    summary = records[-1]
    assert summary["event"] == "summary" and summary["after"]["noise_loss"] < summary["before"]["noise_loss"]
    assert 0 <= summary["after"]["copy_fraction"] <= 1
    assert (out / "samples.png").is_file() and (out / "checkpoints" / "step-6").is_dir()
    file = out / "adapter" / "pytorch_lora_weights.safetensors"
    assert all(k.startswith("unet.") for k in load_file(str(file)))

    ours = UNet2DConditionModel.from_pretrained(pipe_dir, subfolder="unet").eval()
    base = unet_outputs(ours)
    slimtune.load_adapter(ours, out / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        pipe = StableDiffusionPipeline.from_pretrained(pipe_dir)  # diffusers + PEFT: the oracle
    pipe.load_lora_weights(str(out / "adapter"))
    torch.testing.assert_close(unet_outputs(ours), unet_outputs(pipe.unet), atol=1e-5, rtol=1e-5)
    assert (unet_outputs(ours) - base).abs().max() > 1e-4  # the adapter trained: it changes outputs


@pytest.fixture(scope="module")
def loaded(pipe_dir, image_dir):
    """What the run trains with (load_pipeline), and the image set it encodes."""
    images = load_images(image_dir, 16, 3)
    layout = read_layout(pipe_dir, 16, 3, "epsilon")
    notes: list[str] = []
    return load_pipeline(layout, images.captions, images.images, torch.float32, 5, notes.append), images, notes


def test_conditioning_equals_the_pipelines_encode_prompt(pipe_dir, loaded):
    from diffusers import StableDiffusionPipeline

    parts, images, notes = loaded
    assert parts.prompts.captions == tuple(dict.fromkeys(CAPTIONS))  # every distinct caption is a row
    assert len(notes) == 1 and "1 caption(s)" in notes[0] and LONG[:30] in notes[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        pipe = StableDiffusionPipeline.from_pretrained(pipe_dir)
    for caption in parts.prompts.captions:  # LONG included: truncated to 24 tokens as diffusers does
        expect = pipe.encode_prompt(caption, "cpu", 1, False)[0][0]  # (tokens, hidden)
        got = parts.prompts.table[parts.prompts.ids((caption,), "test")][0]
        assert got.shape == (MAX_TOKENS, 12)
        torch.testing.assert_close(got, expect, atol=1e-6, rtol=1e-6)


def test_latents_equal_vae_encode_and_samples_decode_as_the_pipeline(pipe_dir, loaded):
    from diffusers import AutoencoderKL, DDPMScheduler

    parts, images, _ = loaded
    vae = AutoencoderKL.from_pretrained(pipe_dir, subfolder="vae").eval()
    with torch.no_grad():  # diffusers' train_text_to_image_lora.py: sample * scaling_factor
        expect = vae.encode(images.images).latent_dist.sample(generator=torch.Generator().manual_seed(5))
    assert parts.latents.shape == (6, 4, 8, 8)
    torch.testing.assert_close(parts.latents, expect * vae.config.scaling_factor, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(encode_latents(vae, images.images, 5), parts.latents)  # same seed, same draw
    with torch.no_grad():
        pixels = vae.decode(parts.latents / vae.config.scaling_factor).sample.clamp(-1, 1)
    torch.testing.assert_close(decode(parts.vae, parts.latents), pixels, atol=1e-6, rtol=1e-6)
    assert isinstance(parts.scheduler, DDPMScheduler)  # the pipeline's own betas, not the default linear ones
    assert parts.scheduler.config.beta_schedule == "scaled_linear" and parts.scheduler.config.beta_end == 0.012


def test_resume_on_a_pipeline_folder_is_exact(pipe_dir, image_dir, tmp_path):
    cfg = run_config_from_dict(run_dict(pipe_dir, image_dir, tmp_path / "out", snr_gamma=5.0))
    assert_resume_is_exact(cfg, tmp_path / "out")


def broken_copy(pipe_dir: Path, tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    shutil.copytree(pipe_dir, folder)
    return folder


@pytest.mark.parametrize("part", ["unet", "text_encoder", "tokenizer"])
def test_a_pipeline_folder_missing_a_part_is_named(pipe_dir, image_dir, tmp_path, part):
    folder = broken_copy(pipe_dir, tmp_path, "sd")
    shutil.rmtree(folder / part)
    with pytest.raises(ModelLoadError, match=f"a pipeline folder needs unet/, text_encoder/, tokenizer/; missing: {part}/"):
        train(run_config_from_dict(run_dict(folder, image_dir, tmp_path / "out")), log=lambda s: None)
    assert not (tmp_path / "out").exists()


def test_bin_only_weights_are_refused_by_name(pipe_dir, image_dir, tmp_path):
    folder = broken_copy(pipe_dir, tmp_path, "sd")
    (folder / "vae" / "diffusion_pytorch_model.safetensors").rename(folder / "vae" / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"vae: no .safetensors weights \(found \['diffusion_pytorch_model.bin'\]\)"):
        train(run_config_from_dict(run_dict(folder, image_dir, tmp_path / "out")), log=lambda s: None)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, match", [
    ({"data": {"resolution": 15}}, r"data.resolution=15: must be a multiple of 2, the down-sampling of the VAE"),
    ({"data": {"resolution": 10}}, r"data.resolution=10: the latents are 5x5, which the UNet's 2x down-sampling"),
    ({"data": {"channels": 1}}, r"data.channels=1: the VAE in .* takes 3 channels"),
    ({"train": {"prediction_type": "v_prediction"}},
     r"train.prediction_type='v_prediction': the pipeline's .*scheduler_config.json says 'epsilon'"),
])
def test_settings_the_pipeline_cannot_take_are_named_before_it_loads(pipe_dir, image_dir, tmp_path, monkeypatch,
                                                                   change, match):
    import diffusers

    d = run_dict(pipe_dir, image_dir, tmp_path / "out")
    for section, fields in change.items():
        d[section] |= fields
    monkeypatch.setattr(diffusers.UNet2DConditionModel, "from_pretrained", None)  # loading it would fail loudly
    with pytest.raises(RunError, match=match):
        train(run_config_from_dict(d), log=lambda s: None)
    assert not (tmp_path / "out").exists()


def test_cli_missing_tokenizer_is_one_error_line_and_the_file_check_accepts_a_pipeline(pipe_dir, image_dir,
                                                                                       tmp_path):
    run_config_from_dict(run_dict(pipe_dir, image_dir, tmp_path / "out"), check_files=True)  # model_index.json: ok
    folder = broken_copy(pipe_dir, tmp_path, "sd")
    shutil.rmtree(folder / "tokenizer")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(run_dict(folder, image_dir, tmp_path / "out")))
    proc = cli(cfg, tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "missing: tokenizer/" in errors[0], proc.stderr


def test_without_a_vae_the_unet_takes_the_images_and_channels_must_match(pipe_dir, image_dir, tmp_path):
    folder = broken_copy(pipe_dir, tmp_path, "sd")
    shutil.rmtree(folder / "vae")  # pixel space: the 4-channel UNet cannot take RGB images
    with pytest.raises(RunError, match=r"data.channels=3: the UNet in .* takes 4 channels and the pipeline has no vae/"):
        train(run_config_from_dict(run_dict(folder, image_dir, tmp_path / "out")), log=lambda s: None)
    assert not (tmp_path / "out").exists()


def test_an_sdxl_style_unet_is_refused_by_name(pipe_dir, image_dir, tmp_path):
    folder = broken_copy(pipe_dir, tmp_path, "sd")
    config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps(config | {"addition_embed_type": "text_time"}))
    with pytest.raises(ModelLoadError, match=r"unet: addition_embed_type='text_time' \(an SDXL-style UNet"):
        train(run_config_from_dict(run_dict(folder, image_dir, tmp_path / "out")), log=lambda s: None)
    assert not (tmp_path / "out").exists()
