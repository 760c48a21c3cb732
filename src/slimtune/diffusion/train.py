"""Training a UNet by noise prediction: the epoch loop shared by full training and LoRA fine-tuning.

The loop body reads as the maths: draw a batch, ``noise_prediction_loss`` (DDPM noise, optional Min-SNR
weights), backward, clip, AdamW step. What trains is whatever requires a gradient (after
``slimtune.inject``, only the adapters) plus ``extra_params`` (e.g. a label-embedding table).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from slimtune.diffusion.objective import noise_prediction_loss


@dataclass(frozen=True)
class DiffusionTraining:
    """epochs; batch_size; lr (AdamW); snr_gamma: Min-SNR weighting (None: plain MSE; 5 in the paper);
    max_grad_norm: clip (None: no clipping); seed: batch order and noise draws."""

    epochs: int
    batch_size: int = 64
    lr: float = 1e-3
    snr_gamma: float | None = None
    max_grad_norm: float | None = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for field in ("epochs", "batch_size"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{field}={v!r}: must be a positive integer")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr={self.lr!r}: must be a positive number")


def train_unet(unet: nn.Module, scheduler: Any, images: Tensor, labels: Tensor,
               condition: Callable[[Tensor], dict[str, Any]], cfg: DiffusionTraining,
               extra_params: list[nn.Parameter] = (), on_epoch: Callable[[int, float], None] | None = None) -> list[float]:
    """Train on ``images`` (n, c, h, w) in [-1, 1] with ``labels`` (n,); ``condition(labels)`` gives the UNet's
    conditioning (``encoder_hidden_states``, ``class_labels``). Returns the mean loss of each epoch; calls
    ``on_epoch(epoch, loss)`` after each (1-based). Raises ValueError when nothing trains."""
    params = [p for p in unet.parameters() if p.requires_grad] + list(extra_params)
    if not params:
        raise ValueError("nothing to train: no parameter requires a gradient (inject an adapter or unfreeze)")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    unet.train()
    losses = []
    for epoch in range(1, cfg.epochs + 1):
        order, total = torch.randperm(images.shape[0], generator=gen), 0.0
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            loss = noise_prediction_loss(unet, scheduler, images[idx], gen, cfg.snr_gamma, **condition(labels[idx]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / len(order))
        if on_epoch is not None:
            on_epoch(epoch, losses[-1])
    unet.eval()
    return losses
