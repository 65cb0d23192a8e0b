"""CIFAR data module: the shared real subset, a generated tiny copy, and the offline error."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision import transforms

from flgc_lightning.data import CifarDataModule, DataNotFoundError
from flgc_lightning.data.cifar import CIFAR_MEAN, CIFAR_STD


def write_fake_cifar(root: Path, per_file: int = 6, seed: int = 0) -> dict:
    """A tiny dataset in the official cifar-10-batches-py layout (checksums naturally differ)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_file, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_file).tolist()
        with open(folder / name, "wb") as fh:
            pickle.dump({"data": data, "labels": labels, "batch_label": name, "filenames": []}, fh)
        written[name] = (data, labels)
    return written


def test_shared_subset_loads_with_reference_pipeline(cifar_subset):
    dm = CifarDataModule(root=str(cifar_subset), download=False, num_workers=0, batch_size=128)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_set) == 4660 and len(dm.test_set) == 932
    assert dm.num_classes == 10 and dm.input_size == (3, 32, 32)
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (128, 3, 32, 32) and labels.dtype == torch.int64
    assert sorted(set(dm.test_set.labels.tolist())) == list(range(10))
    # Test transform is exactly ToTensor + Normalize(reference mean/std) on the raw pixels.
    raw = dm.test_set.images[0]
    expected = (torch.from_numpy(raw).permute(2, 0, 1).float() / 255 - torch.tensor(CIFAR_MEAN)[:, None, None]) \
        / torch.tensor(CIFAR_STD)[:, None, None]
    torch.testing.assert_close(dm.test_set[0][0], expected)
    train_ops = [type(t) for t in dm.train_set.transform.transforms]
    assert train_ops == [transforms.RandomCrop, transforms.RandomHorizontalFlip, transforms.ToTensor, transforms.Normalize]
    assert dm.train_set.transform.transforms[0].padding == 4


def test_generated_copy_loads_exact_pixels_and_labels(tmp_path):
    written = write_fake_cifar(tmp_path)
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):  # parent folder or the batches folder itself
        dm = CifarDataModule(root=str(root), download=False, num_workers=0, batch_size=4)
        dm.setup()
        assert len(dm.train_set) == 30 and len(dm.test_set) == 6
        data, labels = written["data_batch_2"]
        image = dm.train_set.images[6]  # first image of the second file
        assert np.array_equal(image, data[0].reshape(3, 32, 32).transpose(1, 2, 0))
        assert dm.train_set.labels[6] == labels[0]
        assert dm.test_set.labels.tolist() == written["test_batch"][1]


def test_limits(tmp_path):
    write_fake_cifar(tmp_path)
    dm = CifarDataModule(root=str(tmp_path), download=False, num_workers=0, limit_train=7, limit_test=3)
    dm.setup()
    assert len(dm.train_set) == 7 and len(dm.test_set) == 3


def test_missing_data_offline_is_one_clear_error_and_writes_nothing(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    def offline(*args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    root = tmp_path / "nowhere" / "cifar"
    for download in (False, True):
        dm = CifarDataModule(root=str(root), download=download, num_workers=0)
        with pytest.raises(DataNotFoundError) as err:
            dm.prepare_data()
        message = str(err.value)
        assert str(root / "cifar-10-batches-py") in message and "data_batch_1" in message
        assert not root.exists() and not (tmp_path / "nowhere").exists()


def test_download_lands_in_root_when_online(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    def fake_download(url, download_root, filename=None, md5=None, **kwargs):
        assert url.endswith("cifar-10-python.tar.gz") and md5 == "c58f30108f718f92721af3b95e74349a"
        write_fake_cifar(Path(download_root))

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", fake_download)
    dm = CifarDataModule(root=str(tmp_path / "data"), download=True, num_workers=0)
    dm.prepare_data()
    dm.setup()
    assert len(dm.train_set) == 30 and (tmp_path / "data" / "cifar-10-batches-py" / "test_batch").is_file()


def test_unreadable_batch_file_is_a_clear_error(tmp_path):
    write_fake_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    dm = CifarDataModule(root=str(tmp_path), download=False, num_workers=0)
    with pytest.raises(DataNotFoundError, match="data_batch_3"):
        dm.setup()


def test_loaders_yield_batches_for_train_val_and_test(tmp_path):
    write_fake_cifar(tmp_path)
    dm = CifarDataModule(root=str(tmp_path), download=False, num_workers=0, batch_size=4, eval_batch_size=5)
    dm.setup()
    for loader, size in ((dm.train_dataloader(), 4), (dm.val_dataloader(), 5), (dm.test_dataloader(), 5)):
        images, labels = next(iter(loader))
        assert images.shape == (size, 3, 32, 32) and labels.shape == (size,)
    assert [label for _, label in dm.test_set] == [int(y) for y in next(iter(dm.test_dataloader()))[1]][:5] + \
        [label for _, label in dm.test_set][5:]  # evaluation runs in order
