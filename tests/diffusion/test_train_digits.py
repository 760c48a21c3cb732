"""The noise-prediction training loop, and the digits recipe end to end on a synthetic digits file."""

from __future__ import annotations

import copy
import gzip
import json

import pytest
import torch

import slimtune
from slimtune.control import adapted_layers
from slimtune.diffusion import UNET_ATTENTION
from slimtune.diffusion.digits import DigitsRecipe, bold, load_digits, run_digits
from slimtune.diffusion.train import DiffusionTraining, train_unet

from .conftest import tiny_unet


def test_lora_training_lowers_the_loss_and_moves_only_adapters():
    from diffusers import DDPMScheduler

    from slimtune.diffusion.objective import noise_prediction_loss

    torch.manual_seed(0)
    unet, scheduler = tiny_unet(), DDPMScheduler()
    base = copy.deepcopy(unet.state_dict())
    slimtune.inject(unet, slimtune.LoraConfig(r=4, alpha=4, target_modules=UNET_ATTENTION + ("conv1",)))
    images = torch.tanh(torch.randn(8, 1, 1, 1).expand(8, 4, 8, 8).clone())  # flat images: an easy target
    labels = torch.arange(8)
    text = torch.randn(8, 5, 12)

    def held_out_loss() -> float:  # the same timesteps and noise every time
        with torch.no_grad():
            g = torch.Generator().manual_seed(99)
            return sum(float(noise_prediction_loss(unet.eval(), scheduler, images, g, encoder_hidden_states=text))
                       for _ in range(4)) / 4

    before = held_out_loss()
    losses = train_unet(unet, scheduler, images, labels, lambda y: {"encoder_hidden_states": text[y]},
                        DiffusionTraining(epochs=60, batch_size=8, lr=1e-2, snr_gamma=5.0))
    assert len(losses) == 60 and held_out_loss() < 0.8 * before
    merged = slimtune.merge_and_unload(unet).state_dict()
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(".to_" in k or "conv1" in k for k in changed)


def test_training_config_errors_name_the_field():
    with pytest.raises(ValueError, match="epochs=0"):
        DiffusionTraining(epochs=0)
    with pytest.raises(ValueError, match="lr=-1"):
        DiffusionTraining(epochs=1, lr=-1)
    with pytest.raises(ValueError, match="nothing to train"):
        unet = tiny_unet().requires_grad_(False)
        train_unet(unet, None, torch.zeros(1, 4, 8, 8), torch.zeros(1), lambda y: {}, DiffusionTraining(epochs=1))


def synthetic_digits(path, per_class: int = 4):
    """A digits.csv.gz in scikit-learn's layout (64 pixels 0..16, then the label): a bar per class."""
    rows = []
    for label in range(10):
        for k in range(per_class):
            img = [[0] * 8 for _ in range(8)]
            for r in range(1, 7):
                img[r][k % 6 + 1] = 16
            for c in range(label):  # the class, drawn as a count of dots: every (class, k < 6) image differs
                img[7 - c // 8][c % 8] = 16
            rows.append(",".join(str(v) for row in img for v in row) + f",{label}")
    with gzip.open(path, "wt") as f:
        f.write("\n".join(rows) + "\n")
    return path


def test_load_digits_and_bold(tmp_path):
    images, labels = load_digits(synthetic_digits(tmp_path / "d.csv.gz"))
    assert images.shape == (40, 1, 16, 16) and labels.tolist() == [c for c in range(10) for _ in range(4)]
    assert float(images.min()) >= -1 and float(images.max()) <= 1
    thick = bold(images)
    assert bool((thick >= images).all()) and float((thick > 0).float().mean()) > float((images > 0).float().mean())
    with pytest.raises(FileNotFoundError, match="digits_csv="):
        load_digits(tmp_path / "missing.csv.gz")


@pytest.mark.slow
def test_digits_recipe_end_to_end_on_a_small_file(tmp_path):
    """The whole recipe (base, LoRA, samples, curve, adapter) with few epochs: every file written, the
    adapter loads in diffusers."""
    result = run_digits(tmp_path / "out", DigitsRecipe(base_epochs=1, lora_epochs=2, per_class=2, sample_every=1,
                                                       steps=2), synthetic_digits(tmp_path / "d.csv.gz"), log=lambda s: None)
    assert [c["epoch"] for c in result.curve] == [1, 2] and len(result.lora_losses) == 2
    for name in result.files:
        assert (tmp_path / "out" / name).is_file(), name
    saved = json.loads((tmp_path / "out" / "result.json").read_text())
    assert saved["curve"][0]["threshold"] > 0
    from slimtune.diffusion.digits import build_unet

    other = build_unet()
    other.load_lora_adapter(str(tmp_path / "out" / "lora"), prefix="unet", weight_name="pytorch_lora_weights.safetensors")
    assert any("lora_A" in n for n, _ in other.named_parameters())
    again = run_digits(tmp_path / "again", DigitsRecipe(lora_epochs=1, per_class=1, sample_every=1, steps=2),
                       tmp_path / "d.csv.gz", log=lambda s: None, base_from=tmp_path / "out")
    assert again.base_losses == [] and len(again.lora_losses) == 1
    with pytest.raises(FileNotFoundError, match="base_from="):
        run_digits(tmp_path / "x", DigitsRecipe(), tmp_path / "d.csv.gz", log=lambda s: None, base_from=tmp_path)
