"""Sampling from a (LoRA-adapted) UNet: the denoising loop, and a grid of samples as a matplotlib figure."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


@torch.no_grad()
def sample(unet: nn.Module, scheduler: Any, shape: tuple[int, ...], steps: int,
           generator: torch.Generator | None = None, latents: Tensor | None = None, **conditioning: Any) -> Tensor:
    """Denoise from Gaussian noise (or ``latents``) of ``shape`` (b, c, h, w) in ``steps`` steps of a diffusers
    scheduler (DDPM, DDIM, ...), as a diffusers pipeline without classifier-free guidance does:
    x <- scheduler.step(unet(x, t, **conditioning).sample, t, x).prev_sample. Returns (b, c, h, w)."""
    scheduler.set_timesteps(steps)
    x = latents if latents is not None else torch.randn(shape, generator=generator)
    x = x.to(next(unet.parameters()).dtype) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = unet(scheduler.scale_model_input(x, t), t, **conditioning).sample
        x = scheduler.step(eps, t, x, generator=generator).prev_sample
    return x


def grid_figure(images: Tensor, rows: int, title: str = "", row_labels: list[str] | None = None) -> Any:
    """A matplotlib Figure of ``images`` (n, c, h, w) in [-1, 1] on a ``rows`` x ceil(n / rows) grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = images.shape[0]
    cols = -(-n // rows)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.9 + 0.8, rows * 0.9 + 0.5), squeeze=False)
    pics = ((images.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        for side in ax.spines.values():
            side.set_visible(False)
        if i < n:
            pic = pics[i]
            ax.imshow(pic[..., 0] if pic.shape[-1] == 1 else pic, cmap="gray", vmin=0, vmax=1)
    for r, label in enumerate(row_labels or []):
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
