"""The diffusion training objective: noise prediction under diffusers' DDPM schedule, optional Min-SNR weights.

One step, as diffusers' ``train_text_to_image_lora.py`` runs it: draw t ~ U{0..T-1} and noise e ~ N(0, I),
x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) e (``scheduler.add_noise``), and regress the UNet's output on e
(``epsilon``) or on v = sqrt(a_t) e - sqrt(1 - a_t) x_0 (``v_prediction``, ``scheduler.get_velocity``).
Min-SNR weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy",
arXiv:2303.09556) scales each sample's loss by min(SNR_t, gamma) / SNR_t (/(SNR_t + 1) for v), where
SNR_t = a_t / (1 - a_t).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimtune.train.image_rules import PREDICTION_TYPES  # one list for the run config and the maths


def snr(alphas_cumprod: Tensor, t: Tensor) -> Tensor:
    """SNR_t = a_t / (1 - a_t) for timesteps ``t`` (b,), in fp32: (b,)."""
    a = alphas_cumprod.to(t.device)[t].float()
    return a / (1.0 - a)


def min_snr_weights(alphas_cumprod: Tensor, t: Tensor, gamma: float, prediction_type: str = "epsilon") -> Tensor:
    """Per-sample loss weights (b,): min(SNR_t, gamma) / SNR_t for epsilon, / (SNR_t + 1) for v-prediction.
    Raises ValueError for gamma <= 0 or an unknown prediction type."""
    if not gamma > 0:
        raise ValueError(f"snr_gamma={gamma!r}: must be a positive number (5 in the paper)")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r}: must be one of {', '.join(PREDICTION_TYPES)}")
    s = snr(alphas_cumprod, t)
    clipped = torch.clamp(s, max=gamma)
    return clipped / s if prediction_type == "epsilon" else clipped / (s + 1.0)


def noise_prediction_loss(unet: nn.Module, scheduler: Any, x0: Tensor, generator: torch.Generator | None = None,
                          snr_gamma: float | None = None, **conditioning: Any) -> Tensor:
    """The scalar training loss of one batch ``x0`` (b, c, h, w) for ``unet`` under ``scheduler`` (a diffusers
    DDPMScheduler: its ``alphas_cumprod``, ``add_noise``, ``get_velocity`` and ``config.prediction_type``).
    ``conditioning`` goes to the UNet (``encoder_hidden_states``, ``class_labels``). The loss is computed in
    fp32 as diffusers' scripts do."""
    b = x0.shape[0]
    steps = scheduler.config.num_train_timesteps
    t = torch.randint(0, steps, (b,), generator=generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
    noisy = scheduler.add_noise(x0, noise, t)
    kind = scheduler.config.prediction_type
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"scheduler prediction_type={kind!r}: must be one of {', '.join(PREDICTION_TYPES)}")
    target = noise if kind == "epsilon" else scheduler.get_velocity(x0, noise, t)
    pred = unet(noisy, t, **conditioning).sample
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (b,)
    if snr_gamma is None:
        return per_sample.mean()
    return (per_sample * min_snr_weights(scheduler.alphas_cumprod, t, snr_gamma, kind)).mean()
