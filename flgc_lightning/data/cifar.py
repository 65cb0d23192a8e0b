"""CIFAR LightningDataModules with the reference augmentation (REFERENCE.md section 3)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

from flgc_lightning.data.base import ImageClassificationDataModule
from flgc_lightning.data.cifar_files import CIFAR10, CIFAR100, CifarLayout, ensure_downloaded, find_folder, load_split

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)


def reference_transforms(
    train: bool, size: int = 32, mean=CIFAR_MEAN, std=CIFAR_STD, hflip: bool = True
) -> transforms.Compose:
    """RandomCrop(size, padding=size/8) + HorizontalFlip (if ``hflip``) for training, then ToTensor + Normalize."""
    steps: list = []
    if train:
        steps.append(transforms.RandomCrop(size, padding=max(1, size // 8)))
        if hflip:
            steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    return transforms.Compose(steps)


class ArrayImageDataset(Dataset):
    """HWC uint8 images (C = 1 or 3) + integer labels, transformed as PIL images like torchvision's CIFAR."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform=None) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.images[index]
        image = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


class CifarDataModule(ImageClassificationDataModule):
    """CIFAR-10 (or CIFAR-100) from ``root``; the test split doubles as validation, as in the reference.

    Args:
        root: folder holding ``cifar-10-batches-py`` (or that folder itself). Copies whose
            checksums differ from the official archive (subsets) are accepted.
        download: fetch the official archive when the files are missing.
        dataset: ``"cifar10"`` or ``"cifar100"``.
        limit_train / limit_test: use only the first N images (quick checks).
        batch_size / eval_batch_size / num_workers / pin_memory / seed: see
            :class:`~flgc_lightning.data.base.ImageClassificationDataModule` (reference batch 128).
    """

    def __init__(
        self,
        root: str = "data",
        download: bool = True,
        batch_size: int = 128,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 4,
        pin_memory: bool = True,
        dataset: str = "cifar10",
        limit_train: Optional[int] = None,
        limit_test: Optional[int] = None,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory, seed)
        layouts = {"cifar10": CIFAR10, "cifar100": CIFAR100}
        if dataset not in layouts:
            raise ValueError(f"data.dataset must be one of {sorted(layouts)}, got {dataset!r}")
        self.layout: CifarLayout = layouts[dataset]
        self.root = Path(root).expanduser()
        self.download = download
        self.limit_train, self.limit_test = limit_train, limit_test

    @property
    def num_classes(self) -> int:
        return self.layout.num_classes

    @property
    def input_size(self) -> tuple[int, int, int]:
        return (3, 32, 32)

    def prepare_data(self) -> None:
        ensure_downloaded(self.root, self.layout, self.download)

    def setup(self, stage: Optional[str] = None) -> None:
        folder = find_folder(self.root, self.layout) or ensure_downloaded(self.root, self.layout, self.download)
        if self.train_set is None and stage in (None, "fit"):
            images, labels = load_split(folder, self.layout, train=True)
            n = self.limit_train or len(labels)
            self.train_set = ArrayImageDataset(images[:n], labels[:n], reference_transforms(train=True))
        if self.test_set is None:
            images, labels = load_split(folder, self.layout, train=False)
            n = self.limit_test or len(labels)
            self.test_set = ArrayImageDataset(images[:n], labels[:n], reference_transforms(train=False))
