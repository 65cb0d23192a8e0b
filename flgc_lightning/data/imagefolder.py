"""Your own images: ``root/train/<class>/*.png`` and ``root/val/<class>/*.png`` (torchvision ImageFolder).

The class list comes from the train folders (sorted names, as ImageFolder does) and is
reused for ``val/`` so the label ids agree even when ``val/`` lacks a class. Channels
(1 = grayscale, 3 = colour) and image size are read from the first training image unless
set. Worker processes decode and resize the images into uint8 tensors (``resident: true``
decodes them all once and keeps them on the device); the reference augmentation, scaled to the
size (random crop with padding size/8, horizontal flip), runs on whole batches on the device, and
normalisation uses the training set's own per-channel statistics unless ``mean``/``std`` are given.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from flgc_lightning.data.base import ImageClassificationDataModule
from flgc_lightning.data.batches import ResidentImages
from flgc_lightning.data.cifar_files import DataNotFoundError
from flgc_lightning.data.stats import channel_stats
from flgc_lightning.errors import ConfigError


def load_image(path: str, mode: str) -> Image.Image:
    with open(path, "rb") as fh:
        return Image.open(fh).convert(mode)


class _ClassListImageFolder(ImageFolder):
    """ImageFolder with a given class list (the train split's), so val labels match train labels."""

    def __init__(self, root: str, classes: Sequence[str], **kwargs) -> None:
        self._given_classes = list(classes)
        super().__init__(root, allow_empty=True, **kwargs)

    def find_classes(self, directory):
        extra = sorted(d.name for d in Path(directory).iterdir() if d.is_dir() and d.name not in self._given_classes)
        if extra:
            raise ConfigError(f"'{directory}' has class folders that train/ lacks: {', '.join(extra)}")
        return self._given_classes, {name: i for i, name in enumerate(self._given_classes)}


def _spread(n_total: int, n: Optional[int], seed: int = 0) -> list[int]:
    """A fixed random subset (class folders are stored in order, so the first N would miss classes)."""
    if n is None or n >= n_total:
        return list(range(n_total))
    return sorted(np.random.default_rng(seed).permutation(n_total)[:n].tolist())


class ImageFolderDataModule(ImageClassificationDataModule):
    """Train on ``root/train``; test on ``root/val`` (also the validation split unless ``val_size`` is set,
    as the reference does with CIFAR's test set).

    Args:
        root: folder holding ``train/`` and ``val/`` (names set by ``train_dir`` / ``val_dir``).
        image_size: side length images are resized to; null = the first training image's size.
        channels: 1 (grayscale) or 3 (RGB); null = 1 if the first training image is
            grayscale ('L', 'LA', 'I', '1' modes), else 3. Images are converted to it.
        mean / std: per-channel normalisation; null = computed from up to ``stats_images``
            training images (after resize), so any dataset is normalised sensibly.
        hflip: horizontal flips in the training augmentation (turn off for text, digits...).
        resident: decode every image once and keep the splits on the device (default: read
            batches with ``num_workers`` decoding processes).
        The other arguments: see :class:`~flgc_lightning.data.base.ImageClassificationDataModule`.
    """

    def __init__(
        self,
        root: str,
        train_dir: str = "train",
        val_dir: str = "val",
        image_size: Optional[int] = None,
        channels: Optional[int] = None,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        stats_images: int = 2000,
        hflip: bool = True,
        batch_size: int = 128,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 4,
        pin_memory: bool = True,
        seed: int = 0,
        resident: bool = False,
        val_size: Optional[int] = None,
        val_seed: int = 0,
        limit_train: Optional[int] = None,
        limit_test: Optional[int] = None,
        augment: bool = True,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory, seed, resident, val_size, val_seed,
                         limit_train, limit_test, augment)
        if channels not in (None, 1, 3):
            raise ConfigError(f"channels must be 1, 3 or null (detect), got {channels!r}")
        if (mean is None) != (std is None):
            raise ConfigError("set both mean and std, or neither (computed from the train set)")
        if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
            raise ConfigError(f"image_size must be a positive integer or null, got {image_size!r}")
        self.root = Path(str(root)).expanduser()
        self.train_root, self.val_root = self.root / train_dir, self.root / val_dir
        self._image_size, self._channels = image_size, channels
        self.mean, self.std, self.stats_images, self._hflip = mean, std, stats_images, hflip
        self._classes: Optional[list[str]] = None

    # -- what the model needs to know before setup() ---------------------------------------
    @property
    def classes(self) -> list[str]:
        if self._classes is None:
            self._check_folders()
            self._classes = sorted(d.name for d in self.train_root.iterdir() if d.is_dir())
        return self._classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> list[str]:
        return list(self.classes)

    @property
    def input_size(self) -> tuple[int, int, int]:
        if self._image_size is None or self._channels is None:
            self._inspect_first_image()
        return (self._channels, self._image_size, self._image_size)

    @property
    def hflip(self) -> bool:
        return self._hflip

    def _check_folders(self) -> None:
        layout = "DIR/train/<class>/*.png and DIR/val/<class>/*.png"
        if not self.root.is_dir():
            raise DataNotFoundError(f"image folder data.root='{self.root}' does not exist (expected {layout})")
        for split in (self.train_root, self.val_root):
            if not split.is_dir():
                raise DataNotFoundError(f"'{split}' does not exist: data.root must hold {layout}")
            if not any(d.is_dir() for d in split.iterdir()):
                raise DataNotFoundError(f"'{split}' has no class folders (expected {layout})")

    def _first_image(self) -> Path:
        for class_dir in (self.train_root / c for c in self.classes):
            for path in sorted(class_dir.rglob("*")):
                if path.is_file() and path.suffix.lower() in IMG_EXTENSIONS:
                    return path
        raise DataNotFoundError(f"no images ({', '.join(IMG_EXTENSIONS)}) under '{self.train_root}'")

    def _inspect_first_image(self) -> None:
        path = self._first_image()
        with Image.open(path) as image:
            width, height = image.size
            mode = image.mode
        if self._channels is None:
            self._channels = 1 if mode in ("1", "L", "LA", "I", "I;16", "F") else 3
        if self._image_size is None:
            if width != height:
                raise ConfigError(f"'{path}' is {width}x{height}; set data.image_size to train on square crops")
            self._image_size = width

    # -- datasets ---------------------------------------------------------------------------
    def prepare_data(self) -> None:
        self._check_folders()
        self._first_image()

    def _folder(self, root: Path) -> _ClassListImageFolder:
        """Items are ``(uint8 C x S x S tensor, label)``: decoded, converted and resized, not augmented."""
        mode = "L" if self.input_size[0] == 1 else "RGB"
        size = self.input_size[1]
        decode = transforms.Compose([transforms.Resize((size, size)), transforms.PILToTensor()])
        return _ClassListImageFolder(str(root), self.classes, transform=decode, loader=partial(load_image, mode=mode))

    def _decoded(self, split: Dataset) -> ResidentImages:
        """Every image of ``split`` decoded once (by the worker processes) into one uint8 tensor."""
        images, labels = [], []
        for x, y in DataLoader(split, batch_size=256, num_workers=self.num_workers):
            images.append(x)
            labels.append(y)
        return ResidentImages(torch.cat(images), torch.cat(labels))

    def load_splits(self) -> tuple[Dataset, Dataset]:
        train, test = self._folder(self.train_root), self._folder(self.val_root)
        for split, root in ((train, self.train_root), (test, self.val_root)):
            if len(split) == 0:
                raise DataNotFoundError(f"no images under '{root}'")
        if self.resident:
            return self._decoded(train), self._decoded(test)
        return train, test

    def labels_of(self, split: Dataset) -> np.ndarray:
        if isinstance(split, ResidentImages):
            return split.labels.numpy()
        return np.asarray(split.targets)

    def limited(self, length: int, limit: Optional[int]) -> np.ndarray:
        """Class folders are stored in order: a limit takes a fixed random spread, not the first N."""
        return np.asarray(_spread(length, limit), dtype=np.int64)

    def normalization(self, train: Dataset):
        if self.mean is not None:
            return tuple(self.mean), tuple(self.std)
        if isinstance(train, ResidentImages):
            picked = train.images[torch.as_tensor(_spread(len(train), self.stats_images))]
        else:
            picked = torch.stack([train[i][0] for i in _spread(len(train), self.stats_images)])
        return channel_stats(picked)
