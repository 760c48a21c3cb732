"""Image folders with captions, and the sampler against StableDiffusionPipeline's own denoising loop."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from slimtune.diffusion.images import ImageDataError, load_images
from slimtune.diffusion.sampling import grid_figure, sample

from .conftest import tiny_pipeline


def write_png(path, value: int, size=(6, 4)):
    Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8)).save(path)


def test_folder_with_jsonl_captions(tmp_path):
    write_png(tmp_path / "b.png", 255)
    write_png(tmp_path / "a.png", 0)
    (tmp_path / "captions.jsonl").write_text(json.dumps({"file": "a.png", "text": "black"}) + "\n"
                                             + json.dumps({"file": "b.png", "text": "white"}) + "\n")
    data = load_images(tmp_path, 4)
    assert data.files == ("a.png", "b.png") and data.captions == ("black", "white")
    assert data.images.shape == (2, 3, 4, 4)
    assert float(data.images[0].max()) == -1.0 and float(data.images[1].min()) == 1.0


def test_sidecar_captions_and_grey(tmp_path):
    write_png(tmp_path / "x.png", 127)
    (tmp_path / "x.txt").write_text("grey square\n")
    data = load_images(tmp_path, 2, channels=1)
    assert data.captions == ("grey square",) and data.images.shape == (1, 1, 2, 2)
    assert abs(float(data.images.mean()) - (127 / 127.5 - 1)) < 1e-6


@pytest.mark.parametrize("setup, message", [
    (lambda p: write_png(p / "a.png", 0), "a.png: no caption: want a.txt"),
    (lambda p: (write_png(p / "a.png", 0), (p / "captions.jsonl").write_text("{oops\n")), "captions.jsonl:1: not valid JSON"),
    (lambda p: (write_png(p / "a.png", 0), (p / "captions.jsonl").write_text('{"file": "z.png", "text": "t"}\n')),
     "captions.jsonl:1: file='z.png' is not an image"),
    (lambda p: (write_png(p / "a.png", 0), write_png(p / "b.png", 0),
                (p / "captions.jsonl").write_text('{"file": "a.png", "text": "t"}\n')), "no caption for 1 images (e.g. 'b.png')"),
    (lambda p: ((p / "a.png").write_bytes(b"not a png"), (p / "a.txt").write_text("t")), "a.png: not a readable image"),
    (lambda p: None, "holds no images"),
])
def test_bad_folders_are_named_errors(tmp_path, setup, message):
    setup(tmp_path)
    with pytest.raises(ImageDataError) as e:
        load_images(tmp_path, 4)
    assert message in str(e.value)


def test_sampler_equals_stable_diffusion_pipeline_loop():
    """Same scheduler, same start latents, no guidance: our loop returns the pipeline's latents."""
    from diffusers import DDIMScheduler

    pipe = tiny_pipeline()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    text = torch.randn(2, 5, 12)
    start = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    theirs = pipe(prompt_embeds=text, latents=start.clone(), num_inference_steps=4, guidance_scale=1.0,
                  output_type="latent", height=64, width=64).images
    ours = sample(pipe.unet, DDIMScheduler.from_config(pipe.scheduler.config), (2, 4, 8, 8), 4,
                  latents=start.clone(), encoder_hidden_states=text)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_grid_figure_lays_out_images():
    fig = grid_figure(torch.linspace(-1, 1, 6 * 16).view(6, 1, 4, 4), rows=2, title="t", row_labels=["a", "b"])
    assert len(fig.axes) == 6 and fig.axes[0].get_ylabel() == "a"
