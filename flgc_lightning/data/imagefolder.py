"""Your own images: ``root/train/<class>/*.png`` and ``root/val/<class>/*.png`` (torchvision ImageFolder).

The class list comes from the train folders (sorted names, as ImageFolder does) and is
reused for ``val/`` so the label ids agree even when ``val/`` lacks a class. Channels
(1 = grayscale, 3 = colour) and image size are read from the first training image unless
set. The reference augmentation is scaled to the size (random crop with padding size/8,
horizontal flip), and normalisation uses the training set's own per-channel statistics
unless ``mean``/``std`` are given.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Subset
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from flgc_lightning.data.base import ImageClassificationDataModule
from flgc_lightning.data.cifar import reference_transforms
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
    """Train on ``root/train``, validate and test on ``root/val`` (as the reference does with CIFAR's test set).

    Args:
        root: folder holding ``train/`` and ``val/`` (names set by ``train_dir`` / ``val_dir``).
        image_size: side length images are resized to; null = the first training image's size.
        channels: 1 (grayscale) or 3 (RGB); null = 1 if the first training image is
            grayscale ('L', 'LA', 'I', '1' modes), else 3. Images are converted to it.
        mean / std: per-channel normalisation; null = computed from up to ``stats_images``
            training images (after resize), so any dataset is normalised sensibly.
        hflip: horizontal flips in the training augmentation (turn off for text, digits...).
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
        limit_train: Optional[int] = None,
        limit_test: Optional[int] = None,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory=True, seed=seed)
        if channels not in (None, 1, 3):
            raise ConfigError(f"data.channels must be 1, 3 or null (detect), got {channels!r}")
        if (mean is None) != (std is None):
            raise ConfigError("set both data.mean and data.std, or neither (computed from the train set)")
        self.root = Path(str(root)).expanduser()
        self.train_root, self.val_root = self.root / train_dir, self.root / val_dir
        self._image_size, self._channels = image_size, channels
        self.mean, self.std, self.stats_images, self.hflip = mean, std, stats_images, hflip
        self.limit_train, self.limit_test = limit_train, limit_test
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
    def input_size(self) -> tuple[int, int, int]:
        if self._image_size is None or self._channels is None:
            self._inspect_first_image()
        return (self._channels, self._image_size, self._image_size)

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

    def _folder(self, root: Path, transform) -> _ClassListImageFolder:
        mode = "L" if self.input_size[0] == 1 else "RGB"
        return _ClassListImageFolder(str(root), self.classes, transform=transform, loader=partial(load_image, mode=mode))

    def _stats(self, train: ImageFolder) -> tuple[Sequence[float], Sequence[float]]:
        if self.mean is not None:
            return tuple(self.mean), tuple(self.std)
        size = self.input_size[1]
        resize = transforms.Resize((size, size))
        picked = _spread(len(train), self.stats_images)
        images = np.stack([np.asarray(resize(train.loader(train.samples[i][0]))) for i in picked])
        return channel_stats(images.reshape(len(picked), size, size, -1))

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        size = self.input_size[1]
        train = self._folder(self.train_root, None)
        if len(train) == 0:
            raise DataNotFoundError(f"no images under '{self.train_root}'")
        mean, std = self._stats(train)
        resize = transforms.Resize((size, size))
        train.transform = transforms.Compose([resize, reference_transforms(True, size, mean, std, self.hflip)])
        test = self._folder(self.val_root, transforms.Compose([resize, reference_transforms(False, size, mean, std)]))
        if len(test) == 0:
            raise DataNotFoundError(f"no images under '{self.val_root}'")
        self.train_set = Subset(train, _spread(len(train), self.limit_train))
        self.test_set = Subset(test, _spread(len(test), self.limit_test))
