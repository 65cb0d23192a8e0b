"""Per-channel normalisation statistics of a training set."""
from __future__ import annotations

import numpy as np


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std per channel of ``N x H x W x C`` uint8 images, on the 0-1 scale of ToTensor.

    A constant channel gets std 1 so normalisation never divides by zero.
    """
    pixels = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    mean, std = pixels.mean(axis=0), pixels.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)
