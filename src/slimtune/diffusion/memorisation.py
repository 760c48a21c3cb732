"""Does a fine-tuned diffusion model copy its training images? Distances from samples to the training set.

The seeds warn that image LoRAs trained too long reproduce their training images. Measured here as in
Carlini et al. 2023 ("Extracting Training Data from Diffusion Models", arXiv:2301.13188) in its simplest
form: the Euclidean distance from each generated sample to its nearest training image, in pixel space,
compared with how far training images lie from each other. A sample nearer to a training image than
``ratio`` x the median train-to-train nearest distance counts as a copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

COPYING = 0.5  # the share of samples that are copies from which a model is said to copy its training images


def nearest_distances(samples: Tensor, train: Tensor) -> Tensor:
    """Distance from each sample to its nearest training image: samples (n, ...), train (m, ...) -> (n,)."""
    a, b = samples.flatten(1).double(), train.flatten(1).double()
    return torch.cdist(a, b).min(dim=1).values


def train_spacing(train: Tensor) -> float:
    """Median distance from a training image to its nearest *other* training image (m >= 2)."""
    if train.shape[0] < 2:
        raise ValueError(f"train has {train.shape[0]} images: need at least 2 to measure their spacing")
    x = train.flatten(1).double()
    d = torch.cdist(x, x)
    d.fill_diagonal_(float("inf"))
    return float(d.min(dim=1).values.median())


@dataclass(frozen=True)
class Memorisation:
    """One measurement: median nearest distance, the fraction of samples that are copies, the threshold."""

    median_distance: float
    copy_fraction: float
    threshold: float

    @property
    def copying(self) -> bool:
        """True once at least half the samples are copies."""
        return self.copy_fraction >= COPYING


def memorisation(samples: Tensor, train: Tensor, ratio: float = 0.5) -> Memorisation:
    """Measure ``samples`` (n, ...) against ``train`` (m, ...). Raises ValueError for ratio outside (0, 1]."""
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio={ratio!r}: must be in (0, 1]")
    d = nearest_distances(samples, train)
    threshold = ratio * train_spacing(train)
    return Memorisation(float(d.median()), float((d < threshold).double().mean()), threshold)
