"""scikit-learn's handwritten digits: real images that ship inside an installed package.

1,797 grayscale 8x8 digits (0-9), so the quickstart runs offline with nothing to download.
The images are upscaled once (bilinear) to ``image_size`` so the CIFAR network's three
stride-2 stages still leave a spatial map; the train/test split is fixed and stratified.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from PIL import Image

from flgc_lightning.data.base import ImageClassificationDataModule
from flgc_lightning.data.batches import ResidentImages
from flgc_lightning.data.stats import channel_stats


def load_digit_images(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """All digits as ``N x 1 x S x S`` uint8 (0-255) and int64 labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # values are 0..16
    if image_size != pixels.shape[1]:
        pixels = np.stack([
            np.asarray(Image.fromarray(p).resize((image_size, image_size), Image.BILINEAR)) for p in pixels
        ])
    return pixels[:, None], digits.target.astype(np.int64)


class DigitsDataModule(ImageClassificationDataModule):
    """Digits with a fixed stratified train/test split; the test split doubles as validation unless ``val_size`` is set.

    Args:
        image_size: side length after upscaling from 8 px.
        test_fraction / split_seed: the fixed split (default 25 %: 1,347 train / 450 test).
        hflip: horizontal flips in the training augmentation. Off by default: a mirrored
            digit is a different (or no) digit. Random crops (padding size/8) stay on.
        The other arguments: see :class:`~flgc_lightning.data.base.ImageClassificationDataModule`.
    """

    def __init__(
        self,
        image_size: int = 16,
        test_fraction: float = 0.25,
        split_seed: int = 0,
        hflip: bool = False,
        batch_size: int = 64,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
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
        self.image_size, self.test_fraction, self.split_seed, self._hflip = image_size, test_fraction, split_seed, hflip

    @property
    def num_classes(self) -> int:
        return 10

    @property
    def input_size(self) -> tuple[int, int, int]:
        return (1, self.image_size, self.image_size)

    @property
    def hflip(self) -> bool:
        return self._hflip

    @property
    def class_names(self) -> list[str]:
        return [str(digit) for digit in range(10)]

    def load_splits(self) -> tuple[ResidentImages, ResidentImages]:
        from sklearn.model_selection import train_test_split

        images, labels = load_digit_images(self.image_size)
        train_x, test_x, train_y, test_y = train_test_split(
            images, labels, test_size=self.test_fraction, random_state=self.split_seed, stratify=labels
        )
        return (ResidentImages(torch.from_numpy(train_x), torch.from_numpy(train_y)),
                ResidentImages(torch.from_numpy(test_x), torch.from_numpy(test_y)))

    def normalization(self, train: ResidentImages):
        return channel_stats(train.images)
