"""The noise-prediction objective against diffusers' own formulas, and the memorisation measure."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slimtune.diffusion.memorisation import memorisation, nearest_distances, train_spacing
from slimtune.diffusion.objective import min_snr_weights, noise_prediction_loss, snr

from .conftest import tiny_unet


def scheduler(prediction_type="epsilon"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_min_snr_weights_equal_diffusers_script(kind):
    from diffusers.training_utils import compute_snr

    s, t = scheduler(kind), torch.tensor([0, 10, 200, 999])
    ref_snr = compute_snr(s, t)
    torch.testing.assert_close(snr(s.alphas_cumprod, t), ref_snr)
    # diffusers' train_text_to_image_lora.py, --snr_gamma 5
    w = torch.stack([ref_snr, 5.0 * torch.ones_like(t)], dim=1).min(dim=1)[0]
    w = w / ref_snr if kind == "epsilon" else w / (ref_snr + 1)
    torch.testing.assert_close(min_snr_weights(s.alphas_cumprod, t, 5.0, kind), w)
    with pytest.raises(ValueError, match="snr_gamma=0"):
        min_snr_weights(s.alphas_cumprod, t, 0)


@pytest.mark.parametrize("gamma", [None, 5.0])
def test_loss_is_the_script_loss_for_the_same_draws(gamma):
    unet, s = tiny_unet(), scheduler()
    x0, c = torch.randn(3, 4, 8, 8), torch.randn(3, 5, 12)
    loss = noise_prediction_loss(unet, s, x0, torch.Generator().manual_seed(7), gamma, encoder_hidden_states=c)
    g = torch.Generator().manual_seed(7)  # the same draws, in the same order, the script's way
    t = torch.randint(0, 1000, (3,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    pred = unet(s.add_noise(x0, noise, t), t, encoder_hidden_states=c).sample
    per = F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
    if gamma is not None:
        per = per * min_snr_weights(s.alphas_cumprod, t, gamma)
    torch.testing.assert_close(loss, per.mean())


def test_memorisation_counts_copies():
    g = torch.Generator().manual_seed(0)
    train = torch.rand(20, 1, 8, 8, generator=g)
    spacing = train_spacing(train)
    fresh = torch.rand(10, 1, 8, 8, generator=g)
    copies = train[:10] + 1e-3 * torch.randn(10, 1, 8, 8, generator=g)
    assert float(nearest_distances(copies, train).max()) < 0.01
    assert memorisation(copies, train).copying and memorisation(copies, train).copy_fraction == 1.0
    m = memorisation(fresh, train)
    assert not m.copying and m.threshold == pytest.approx(0.5 * spacing)
    # brute force oracle for the nearest distance
    brute = torch.tensor([min(float((s - t).norm()) for t in train) for s in fresh], dtype=torch.float64)
    torch.testing.assert_close(nearest_distances(fresh, train), brute)
    with pytest.raises(ValueError, match="ratio=0"):
        memorisation(fresh, train, ratio=0)
