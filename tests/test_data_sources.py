"""Digits (quickstart data) and image-folder data modules on real pixels."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flgc_lightning.data import DataNotFoundError, DigitsDataModule, ImageFolderDataModule, ResidentImages
from flgc_lightning.data.stats import channel_stats
from flgc_lightning.errors import ConfigError


def test_digits_split_is_fixed_stratified_and_exact():
    from sklearn.datasets import load_digits

    dm = DigitsDataModule(image_size=8)  # no upscaling: pixels comparable with sklearn's
    dm.setup()
    assert dm.num_classes == 10 and dm.input_size == (1, 8, 8)
    assert len(dm.train_set) == 1347 and len(dm.test_set) == 450
    digits = load_digits()
    # Stratified: each digit's share of the test split is 25 % of its count, up to rounding.
    assert np.abs(np.bincount(dm.test_set.labels.numpy()) - 0.25 * np.bincount(digits.target)).max() <= 1
    expected = np.round(digits.images * 255 / 16).astype(np.uint8)
    # Every split image is one of sklearn's images with the same label.
    lookup = {img.tobytes(): int(lab) for img, lab in zip(expected, digits.target)}
    for image, label in zip(dm.test_set.images[:50], dm.test_set.labels[:50]):
        assert lookup[image[0].numpy().tobytes()] == label
    again = DigitsDataModule(image_size=8)
    again.setup()
    assert torch.equal(again.test_set.labels, dm.test_set.labels)  # same split every time


def test_digits_upscaled_augmentation_scales_with_size():
    dm = DigitsDataModule(image_size=16, limit_train=100, limit_test=40)
    dm.setup()
    assert dm.input_size == (1, 16, 16) and len(dm.train_set) == 100 and len(dm.test_set) == 40
    assert dm.test_set.images.shape[1:] == (1, 16, 16)
    assert dm.crop_padding == 2 and not dm.hflip  # size / 8; no flips for digits
    batch = next(iter(dm.train_dataloader()))
    assert batch.crops[:, 2].eq(0).all() and batch.crops[:, :2].max() <= 4
    pixels = dm.train_set.images.double() / 255  # normalised with the train split's own stats
    assert dm.transform.mean == pytest.approx([pixels.mean().item()])
    assert dm.transform.std == pytest.approx([pixels.std(unbiased=False).item()])


def write_png_tree(root: Path, classes=("cat", "dog", "owl"), per_class=(6, 3), size=12, mode="RGB", seed=0) -> dict:
    """root/train/<class>/i.png and root/val/<class>/i.png with a class-dependent brightness."""
    rng = np.random.default_rng(seed)
    saved: dict = {}
    for split, count in zip(("train", "val"), per_class):
        for k, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                shape = (size, size, 3) if mode == "RGB" else (size, size)
                pixels = np.clip(rng.normal(60 + 70 * k, 20, shape), 0, 255).astype(np.uint8)
                Image.fromarray(pixels, mode).save(folder / f"{i}.png")
                saved[(split, name, i)] = pixels
    return saved


def test_imagefolder_colour_classes_labels_and_stats(tmp_path):
    saved = write_png_tree(tmp_path)
    for resident in (False, True):
        dm = ImageFolderDataModule(root=str(tmp_path), num_workers=0, batch_size=4, resident=resident)
        assert dm.classes == ["cat", "dog", "owl"] and dm.num_classes == 3 and dm.input_size == (3, 12, 12)
        dm.prepare_data()
        dm.setup()
        assert len(dm.train_set) == 18 and len(dm.test_set) == 9
        assert isinstance(dm.train_set, ResidentImages) == resident
        train_pixels = np.stack([saved[("train", c, i)] for c in ("cat", "dog", "owl") for i in range(6)])
        mean, std = channel_stats(torch.from_numpy(train_pixels).permute(0, 3, 1, 2))
        assert dm.transform.mean == pytest.approx(mean) and dm.transform.std == pytest.approx(std)
        images, labels = dm.on_after_batch_transfer(next(iter(dm.test_dataloader())), 0)
        # val is sorted by class: index 4 = dog/1.png
        assert labels.tolist() == [0, 0, 0, 1]
        expected = (torch.from_numpy(saved[("val", "dog", 0)]).permute(2, 0, 1).float() / 255
                    - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
        torch.testing.assert_close(images[3], expected)
        assert dm.crop_padding == 1 and dm.hflip  # 12 // 8
        epoch = list(dm.train_dataloader())
        assert sorted(torch.cat([b.labels for b in epoch]).tolist()) == [0] * 6 + [1] * 6 + [2] * 6


def test_imagefolder_grayscale_resize_and_missing_val_class(tmp_path):
    write_png_tree(tmp_path, size=20, mode="L")
    for f in (tmp_path / "val" / "cat").iterdir():  # val without its first class: labels must still match
        f.unlink()
    (tmp_path / "val" / "cat").rmdir()
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=16, mean=[0.5], std=[0.5], num_workers=0)
    assert dm.input_size == (1, 16, 16)
    dm.setup()
    labels = [label for _, label in dm.test_set.samples]
    assert labels == [1, 1, 1, 2, 2, 2]
    image, _ = dm.test_set[0]
    assert image.shape == (1, 16, 16) and image.dtype == torch.uint8
    forced = ImageFolderDataModule(root=str(tmp_path), channels=3, num_workers=0)
    assert forced.input_size == (3, 20, 20)
    forced.setup()
    assert forced.train_set[0][0].shape == (3, 20, 20)


def test_imagefolder_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(DataNotFoundError, match="does not exist"):
        ImageFolderDataModule(root=str(tmp_path / "nope")).prepare_data()
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataNotFoundError, match=r"val' does not exist"):
        ImageFolderDataModule(root=str(tmp_path)).prepare_data()
    (tmp_path / "val" / "a").mkdir(parents=True)
    with pytest.raises(DataNotFoundError, match="no images"):
        ImageFolderDataModule(root=str(tmp_path)).prepare_data()
    (tmp_path / "val" / "zebra").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "train" / "a" / "x.png")
    with pytest.raises(ConfigError, match="zebra"):
        ImageFolderDataModule(root=str(tmp_path), num_workers=0).setup()
    with pytest.raises(ConfigError, match="channels"):
        ImageFolderDataModule(root=str(tmp_path), channels=2)


class _Planted:
    """Unpickles as a call of ``os.mkdir(path)``: what a crafted data file could run."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        import os
        return (os.mkdir, (self.path,))


def test_cifar_batch_files_cannot_run_code(tmp_path, cifar_subset):
    """A CIFAR batch file is a pickle; one that names a callable other than numpy's array rebuilding is
    refused with a clear error, and the callable never runs. The real subset still loads."""
    import pickle
    import shutil

    from flgc_lightning.data import CifarDataModule

    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    shutil.copytree(cifar_subset / "cifar-10-batches-py", folder)
    marker = tmp_path / "side-effect"
    with open(folder / "data_batch_3", "wb") as fh:
        pickle.dump({"data": np.zeros((1, 3072), np.uint8), "labels": [0], "hook": _Planted(str(marker))}, fh)
    dm = CifarDataModule(root=str(tmp_path / "cifar"), download=False)
    with pytest.raises(DataNotFoundError, match=r"could not read cifar10 file .*data_batch_3.*references posix\.mkdir"):
        dm.setup()
    assert not marker.exists()
    real = CifarDataModule(root=str(cifar_subset), download=False, limit_train=10)
    real.setup()
    assert len(real.train_set) == 10
