"""Reproducible, resumable sampling: the data a run sees depends only on (seed, epoch, index).

Lightning keeps samplers that are ``DistributedSampler`` instances (and calls their
``set_epoch``), so this sampler also does the per-rank split itself under DDP.
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one sample's augmentation in one epoch."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class EpochSampler(DistributedSampler):
    """Yields ``(epoch, index)`` keys: a permutation seeded by ``(seed, epoch)``, split across ranks.

    The key carries the epoch so the dataset can seed each sample's random
    augmentation by ``(seed, epoch, index)`` (see :class:`~flgc_lightning.data.cifar.ArrayImageDataset`),
    making a run's data independent of workers and of where it was resumed.
    ``skip_in_epoch`` drops the first samples of one epoch: the ones a resumed run already trained on.
    """

    def __init__(self, length: int, shuffle: bool = True, seed: int = 0) -> None:  # noqa: D107
        # DistributedSampler.__init__ would query torch.distributed; the split is done in __iter__.
        self.length, self.shuffle, self.seed = length, shuffle, seed
        self.epoch, self.drop_last = 0, False
        self._skip: dict[int, int] = {}

    @staticmethod
    def _world() -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(), dist.get_rank()
        return 1, 0

    @property
    def num_replicas(self) -> int:
        return self._world()[0]

    @property
    def rank(self) -> int:
        return self._world()[1]

    def __len__(self) -> int:
        return math.ceil(self.length / self.num_replicas)

    def skip_in_epoch(self, epoch: int, samples: int) -> None:
        self._skip = {epoch: samples}

    def __iter__(self) -> Iterator[tuple[int, int]]:
        world, rank = self._world()
        if self.shuffle:
            order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed + 1_000_003 * self.epoch))
        else:
            order = torch.arange(self.length)
        per_rank = math.ceil(self.length / world)
        order = order.tolist()
        order += order[: per_rank * world - len(order)]  # pad like DistributedSampler
        mine = order[rank::world]
        start = self._skip.pop(self.epoch, 0)
        epoch = self.epoch
        return iter([(epoch, i) for i in mine[start:]])


class SeededAugmentation(Dataset):
    """Wraps a map-style dataset so that key ``(epoch, index)`` runs its random transforms under the
    seed ``(seed, epoch, index)``, leaving the global RNG as it was. Plain ``index`` keys pass through."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            return self.dataset[key]
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            return self.dataset[index]
