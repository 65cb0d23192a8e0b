"""Whole-batch augmentation on the training device, planned per epoch.

The reference augments one PIL image at a time: pad 4 + random 32x32 crop, horizontal flip
with p=0.5, ToTensor, Normalize. Here the random choices of a whole epoch come from one
generator seeded by ``(seed, epoch)`` (:class:`EpochPlan`), indexed by position in the epoch,
so the data a run sees depends only on ``(seed, epoch, position)``: not on workers, devices or
where a run was resumed. :func:`augment` then applies a batch's crops and flips with two
gathers on uint8 pixels and normalises with the reference's own arithmetic
(``x / 255``, ``- mean``, ``/ std``, each rounded in float32), so CPU and CUDA give the same bits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


class ImageBatch(NamedTuple):
    """What the loaders yield: uint8 pixels, labels, and this batch's crops (``None``: evaluation).

    ``crops`` is ``B x 3`` int64: row offset, column offset (0..2*pad) and flip (0/1).
    Lightning moves it to the device; :meth:`~flgc_lightning.data.base.ImageClassificationDataModule.on_after_batch_transfer`
    turns it into normalised float images there.
    """

    images: Tensor
    labels: Tensor
    crops: Optional[Tensor] = None


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator seeded by a well-mixed ``(seed, epoch)``."""
    state = np.random.SeedSequence([int(seed), int(epoch)]).generate_state(2, np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


@dataclass(frozen=True)
class EpochPlan:
    """One epoch's data order and random crops, position by position (all CPU int64 tensors).

    ``order[p]`` is the image at position ``p``; ``crops[p]`` its row offset, column offset and
    flip. Drawn in a fixed sequence from one ``(seed, epoch)`` generator, so any slice of
    positions can be rebuilt without the ones before it.
    """

    order: Tensor
    crops: Tensor

    @classmethod
    def draw(cls, seed: int, epoch: int, length: int, pad: int, hflip: bool, shuffle: bool = True) -> "EpochPlan":
        g = epoch_generator(seed, epoch)
        order = torch.randperm(length, generator=g) if shuffle else torch.arange(length)
        offsets = torch.randint(0, 2 * pad + 1, (length, 2), generator=g)
        flips = torch.randint(0, 2, (length, 1), generator=g)
        if not hflip:
            flips.zero_()
        return cls(order, torch.cat([offsets, flips], dim=1))

    def shard(self, rank: int, world: int) -> "EpochPlan":
        """This rank's positions: the plan padded by wrapping to a multiple of ``world`` (like
        ``DistributedSampler``), then every ``world``-th position from ``rank``."""
        per_rank = -(-len(self.order) // world)
        extra = per_rank * world - len(self.order)
        wrap = torch.arange(len(self.order) + extra) % len(self.order)
        keep = wrap[rank::world]
        return EpochPlan(self.order[keep], self.crops[keep])


def normalize(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 ``B x C x H x W`` -> float32, exactly ``(x / 255 - mean) / std`` as ToTensor + Normalize round it."""
    out = images.to(torch.float32).div_(255)
    return out.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))


def crop_and_flip(images: Tensor, crops: Tensor, pad: int) -> Tensor:
    """Zero-pad by ``pad``, cut each image's window at its offsets, mirror where its flip is set.

    Two gathers with broadcast (stride-0) indices: rows, then columns; the flip is folded into
    the column index, so no per-image Python work and no big index tensor is built.
    """
    b, c, h, w = images.shape
    if pad:
        images = F.pad(images, (pad, pad, pad, pad))
    crops = crops.to(images.device)
    rows = crops[:, :1] + torch.arange(h, device=images.device)
    rows = rows.view(b, 1, h, 1).expand(b, c, h, images.shape[3])
    cols = torch.arange(w, device=images.device).expand(b, w)
    cols = torch.where(crops[:, 2:3].bool(), w - 1 - cols, cols) + crops[:, 1:2]
    return images.gather(2, rows).gather(3, cols.view(b, 1, 1, w).expand(b, c, h, w))


@dataclass
class BatchTransform:
    """uint8 :class:`ImageBatch` -> ``(float images, labels)``: reference augmentation when the batch has crops."""

    mean: Sequence[float]
    std: Sequence[float]
    pad: int

    def __post_init__(self) -> None:
        self._stats: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def _mean_std(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if device not in self._stats:
            self._stats[device] = (torch.tensor(self.mean, dtype=torch.float32, device=device),
                                   torch.tensor(self.std, dtype=torch.float32, device=device))
        return self._stats[device]

    def __call__(self, batch: ImageBatch) -> tuple[Tensor, Tensor]:
        images = batch.images
        if batch.crops is not None:
            images = crop_and_flip(images, batch.crops, self.pad)
        return normalize(images, *self._mean_std(images.device)), batch.labels
