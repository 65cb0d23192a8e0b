"""Per-channel normalisation statistics of a training set."""
from __future__ import annotations

import torch
from torch import Tensor


def channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std per channel of ``N x C x H x W`` uint8 images, on the 0-1 scale of ToTensor.

    A constant channel gets std 1 so normalisation never divides by zero.
    """
    pixels = images.transpose(0, 1).reshape(images.shape[1], -1).double() / 255.0
    mean, std = pixels.mean(dim=1), pixels.std(dim=1, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)
