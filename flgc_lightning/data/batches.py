"""Training and evaluation batches: uint8 images from a resident tensor or a loader, planned per epoch.

Two sources of pixels, one batching logic:

- :class:`ResidentImages`: the whole split as one uint8 ``N x C x H x W`` tensor on the training
  device (CIFAR-10 is 150 MB). A batch is one ``index_select``; no worker processes.
- :class:`LoaderImages`: a map-style dataset read by a ``DataLoader`` with worker processes, for
  images that don't fit on the device or must be decoded from files (image folders).

:class:`TrainBatches` draws the epoch's :class:`~flgc_lightning.data.augment.EpochPlan` when the
first batch is requested, not when the iterator is created. Lightning creates the iterator of a
resumed run before it sets the sampler epoch (``FitLoop.setup_data`` runs before
``on_advance_start``), and a loader's worker processes start fetching at that moment: a plan
drawn then belongs to the epoch before. Drawing it lazily, from the epoch Lightning has set,
makes the batches of a resumed run the batches of the uninterrupted run.
"""
from __future__ import annotations

import math
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from flgc_lightning.data.augment import EpochPlan, ImageBatch


def world() -> tuple[int, int]:
    """``(world size, rank)`` of the default process group, ``(1, 0)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class ResidentImages(Dataset):
    """A split held as tensors: uint8 images ``N x C x H x W`` and int64 labels, moved to a device once."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 N x C x H x W, got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:  # the loader path reads it like any dataset
        return self.images[index], self.labels[index]

    @property
    def nbytes(self) -> int:
        return self.images.numel() * self.images.element_size()

    def to(self, device: torch.device) -> "ResidentImages":
        if self.images.device != torch.device(device):
            self.images, self.labels = self.images.to(device), self.labels.to(device)
        return self

    def take(self, index: Tensor) -> tuple[Tensor, Tensor]:
        index = index.to(self.images.device, non_blocking=True)
        return self.images.index_select(0, index), self.labels.index_select(0, index)


class PlanSampler:
    """The epoch counter Lightning sets (``set_epoch``, found as the loader's ``sampler``), the plan
    it draws, and the part of one epoch a resumed run skips."""

    def __init__(self, length: int, seed: int, pad: int, hflip: bool, shuffle: bool = True) -> None:
        self.length, self.seed, self.pad, self.hflip, self.shuffle = length, seed, pad, hflip, shuffle
        self.epoch = 0
        self.active_epoch: Optional[int] = None  # the epoch whose plan was last drawn
        self._skip: dict[int, int] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_in_epoch(self, epoch: int, positions: int) -> None:
        self._skip = {epoch: positions}

    def draw(self) -> tuple[EpochPlan, int]:
        """This rank's plan for the current epoch, and the first position to train on."""
        epoch = self.epoch
        self.active_epoch = epoch
        size, rank = world()
        plan = EpochPlan.draw(self.seed, epoch, self.length, self.pad, self.hflip, self.shuffle).shard(rank, size)
        return plan, self._skip.pop(epoch, 0)


class TrainBatches:
    """Shuffled, augmented training batches of a :class:`PlanSampler` epoch (a sized iterable of :class:`ImageBatch`).

    ``source`` is a :class:`ResidentImages` (batches gathered on its device) or any map-style
    dataset of ``(uint8 image, label)`` read through a ``DataLoader`` (``loader_options``: workers etc.).
    """

    def __init__(self, source: Dataset, batch_size: int, sampler: PlanSampler, loader_options: Optional[dict] = None) -> None:
        self.source, self.batch_size, self.sampler = source, batch_size, sampler
        self.loader_options = loader_options
        self._loader: Optional[DataLoader] = None
        self._planned = _PlannedBatches()

    def __len__(self) -> int:
        return math.ceil(math.ceil(self.sampler.length / world()[0]) / self.batch_size)

    def __iter__(self) -> Iterator[ImageBatch]:
        plan, start = self.sampler.draw()
        order, crops = plan.order[start:], plan.crops[start:]
        if self.loader_options is None:
            order = order.to(self.source.images.device)
            for i in range(0, len(order), self.batch_size):
                images, labels = self.source.take(order[i:i + self.batch_size])
                yield ImageBatch(images, labels, crops[i:i + self.batch_size])
            return
        self._planned.batches = [order[i:i + self.batch_size].tolist() for i in range(0, len(order), self.batch_size)]
        batches = iter(self._workers())
        for i, (images, labels) in zip(range(0, len(order), self.batch_size), batches):
            yield ImageBatch(images, labels, crops[i:i + self.batch_size])

    def _workers(self) -> DataLoader:
        """One DataLoader for the whole run (workers persist); it reads the batches planned just before ``iter``."""
        if self._loader is None:
            options = dict(self.loader_options)
            options["persistent_workers"] = options.get("num_workers", 0) > 0
            self._loader = DataLoader(self.source, batch_sampler=self._planned, **options)
        return self._loader

    def close(self) -> None:
        """Stop the worker processes now (they persist from epoch to epoch). Left to the garbage collector, as when
        the loader is reachable only from Lightning's trainer, which lives in reference cycles, torch collects the
        loader's queues before the loader and then waits 5 s for each worker before it kills it: 10 s with two
        workers, in the middle of whatever ran next (the next job of a sweep, the next trial of a search)."""
        loader, self._loader = self._loader, None
        iterator = getattr(loader, "_iterator", None)  # the persistent workers' iterator (what Lightning shuts down
        if iterator is not None:  # for the DataLoaders it holds itself; it cannot see this one)
            iterator._shutdown_workers()


class _PlannedBatches:
    """A batch sampler that yields the index lists :class:`TrainBatches` planned for this epoch (it holds no reference
    back to them, so the loader is freed as soon as its owner is)."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class EvalBatches:
    """Evaluation batches in order, no augmentation; under DDP each rank takes a contiguous share."""

    def __init__(self, source: Dataset, batch_size: int, loader_options: Optional[dict] = None) -> None:
        self.source, self.batch_size, self.loader_options = source, batch_size, loader_options

    def _indices(self) -> Tensor:
        size, rank = world()
        return torch.tensor_split(torch.arange(len(self.source)), size)[rank]

    def __len__(self) -> int:
        return math.ceil(len(self._indices()) / self.batch_size)

    def __iter__(self) -> Iterator[ImageBatch]:
        indices = self._indices()
        if self.loader_options is None:
            indices = indices.to(self.source.images.device)
            for i in range(0, len(indices), self.batch_size):
                yield ImageBatch(*self.source.take(indices[i:i + self.batch_size]))
            return
        batches = [indices[i:i + self.batch_size].tolist() for i in range(0, len(indices), self.batch_size)]
        for images, labels in DataLoader(self.source, batch_sampler=batches, **self.loader_options):
            yield ImageBatch(images, labels)
