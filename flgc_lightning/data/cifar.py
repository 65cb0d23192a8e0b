"""CIFAR-10/100 LightningDataModule with the reference augmentation (REFERENCE.md section 3)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from flgc_lightning.data.base import ImageClassificationDataModule
from flgc_lightning.data.batches import ResidentImages
from flgc_lightning.data.cifar_files import (CIFAR10, CIFAR100, CifarLayout, ensure_downloaded, find_folder,
                                             load_batch_file, load_split)
from flgc_lightning.errors import ConfigError

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
CLASS_NAMES_FILE = {"cifar10": ("batches.meta", "label_names"), "cifar100": ("meta", "fine_label_names")}


class CifarDataModule(ImageClassificationDataModule):
    """CIFAR-10 (or CIFAR-100) from ``root``; the test split doubles as validation unless ``val_size`` is set.

    Training batches get the reference augmentation (pad 4 + random 32x32 crop, horizontal flip,
    per-channel normalisation with the reference mean/std), applied to whole batches on the device.

    Args:
        root: folder holding ``cifar-10-batches-py`` (or that folder itself). Copies whose
            checksums differ from the official archive (subsets) are accepted.
        download: fetch the official archive when the files are missing.
        dataset: ``"cifar10"`` or ``"cifar100"``.
        The other arguments: see :class:`~flgc_lightning.data.base.ImageClassificationDataModule`.
    """

    def __init__(
        self,
        root: str = "data",
        download: bool = True,
        dataset: str = "cifar10",
        batch_size: int = 128,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 4,
        pin_memory: bool = True,
        seed: int = 0,
        resident: bool = True,
        val_size: Optional[int] = None,
        val_seed: int = 0,
        limit_train: Optional[int] = None,
        limit_test: Optional[int] = None,
        augment: bool = True,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory, seed, resident, val_size, val_seed,
                         limit_train, limit_test, augment)
        layouts = {"cifar10": CIFAR10, "cifar100": CIFAR100}
        if dataset not in layouts:
            raise ConfigError(f"dataset must be one of {sorted(layouts)}, got {dataset!r}")
        self.layout: CifarLayout = layouts[dataset]
        self.root = Path(root).expanduser()
        self.download = download

    @property
    def num_classes(self) -> int:
        return self.layout.num_classes

    @property
    def input_size(self) -> tuple[int, int, int]:
        return (3, 32, 32)

    @property
    def class_names(self) -> Optional[list[str]]:
        """From the dataset's own meta file (``batches.meta`` / ``meta``), if it is there."""
        folder = find_folder(self.root, self.layout)
        if folder is None:
            return None
        filename, key = CLASS_NAMES_FILE[self.layout.name]
        try:
            names = [str(n) for n in load_batch_file(folder / filename)[key]]
        except Exception:  # a subset without its meta file: indices only
            return None
        return names if len(names) == self.num_classes else None

    def prepare_data(self) -> None:
        ensure_downloaded(self.root, self.layout, self.download)

    def load_splits(self) -> tuple[ResidentImages, ResidentImages]:
        folder = find_folder(self.root, self.layout) or ensure_downloaded(self.root, self.layout, self.download)
        return tuple(ResidentImages(*map(torch.from_numpy, load_split(folder, self.layout, train)))
                     for train in (True, False))

    def normalization(self, train: ResidentImages):
        return CIFAR_MEAN, CIFAR_STD
