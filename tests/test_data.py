"""CIFAR data module: the shared real subset, a generated tiny copy, and the offline error."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from flgc_lightning.data import CifarDataModule, DataNotFoundError
from flgc_lightning.data.cifar import CIFAR_MEAN, CIFAR_STD
from flgc_lightning.errors import ConfigError


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
    dm = CifarDataModule(root=str(cifar_subset), download=False, batch_size=128)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_set) == 4660 and len(dm.test_set) == 932 and dm.val_set is dm.test_set
    assert dm.validation_is_test and dm.num_classes == 10 and dm.input_size == (3, 32, 32)
    batch = next(iter(dm.train_dataloader()))
    images, labels = dm.on_after_batch_transfer(batch, 0)
    assert images.shape == (128, 3, 32, 32) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert batch.images.dtype == torch.uint8 and batch.crops.shape == (128, 3)
    assert sorted(set(dm.test_set.labels.tolist())) == list(range(10))
    # Evaluation: exactly ToTensor + Normalize(reference mean/std) on the raw pixels, in order.
    images, labels = dm.on_after_batch_transfer(next(iter(dm.test_dataloader())), 0)
    raw = dm.test_set.images[0]
    expected = (raw.float() / 255 - torch.tensor(CIFAR_MEAN)[:, None, None]) / torch.tensor(CIFAR_STD)[:, None, None]
    torch.testing.assert_close(images[0], expected)
    assert labels.tolist() == dm.test_set.labels[:128].tolist()  # eval_batch_size defaults to batch_size
    assert dm.crop_padding == 4 and dm.hflip


def test_generated_copy_loads_exact_pixels_and_labels(tmp_path):
    written = write_fake_cifar(tmp_path)
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):  # parent folder or the batches folder itself
        dm = CifarDataModule(root=str(root), download=False, batch_size=4)
        dm.setup()
        assert len(dm.train_set) == 30 and len(dm.test_set) == 6
        data, labels = written["data_batch_2"]
        image = dm.train_set.images[6]  # first image of the second file
        assert np.array_equal(image.numpy(), data[0].reshape(3, 32, 32))
        assert dm.train_set.labels[6] == labels[0]
        assert dm.test_set.labels.tolist() == written["test_batch"][1]


def test_validation_split_is_held_out_stratified_disjoint_and_reproducible(cifar_subset):
    def split(seed):
        dm = CifarDataModule(root=str(cifar_subset), download=False, val_size=500, val_seed=seed)
        dm.setup()
        return dm
    a, b, c = split(0), split(0), split(1)
    assert len(a.train_set) == 4160 and len(a.val_set) == 500 and len(a.test_set) == 932 and not a.validation_is_test
    assert torch.equal(a.val_set.images, b.val_set.images) and torch.equal(a.train_set.labels, b.train_set.labels)
    assert not torch.equal(a.val_set.images, c.val_set.images)
    # disjoint: no training image is a validation image (compare pixels, the images themselves)
    train_keys = {bytes(x.numpy()) for x in a.train_set.images}
    assert not any(bytes(x.numpy()) in train_keys for x in a.val_set.images)
    full = CifarDataModule(root=str(cifar_subset), download=False)
    full.setup()
    assert len(train_keys | {bytes(x.numpy()) for x in a.val_set.images}) == len({bytes(x.numpy()) for x in full.train_set.images})
    # stratified: class shares of the held-out images follow the training split's
    share = torch.bincount(full.train_set.labels, minlength=10).double() / len(full.train_set)
    held = torch.bincount(a.val_set.labels, minlength=10).double()
    assert (held - 500 * share).abs().max() <= 1.0
    # validation batches come from the held-out images, test batches from the test split
    _, val_labels = a.on_after_batch_transfer(next(iter(a.val_dataloader())), 0)
    assert val_labels.tolist() == a.val_set.labels[:len(val_labels)].tolist()
    with pytest.raises(ConfigError, match="val_size"):
        CifarDataModule(root=str(cifar_subset), download=False, val_size=0)


def test_limits(tmp_path):
    write_fake_cifar(tmp_path)
    dm = CifarDataModule(root=str(tmp_path), download=False, limit_train=7, limit_test=3)
    dm.setup()
    assert len(dm.train_set) == 7 and len(dm.test_set) == 3


def test_missing_data_offline_is_one_clear_error_and_writes_nothing(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    def offline(*args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    root = tmp_path / "nowhere" / "cifar"
    for download in (False, True):
        dm = CifarDataModule(root=str(root), download=download)
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
    dm = CifarDataModule(root=str(tmp_path / "data"), download=True)
    dm.prepare_data()
    dm.setup()
    assert len(dm.train_set) == 30 and (tmp_path / "data" / "cifar-10-batches-py" / "test_batch").is_file()


def test_unreadable_batch_file_is_a_clear_error(tmp_path):
    write_fake_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    dm = CifarDataModule(root=str(tmp_path), download=False)
    with pytest.raises(DataNotFoundError, match="data_batch_3"):
        dm.setup()


def test_loaders_yield_batches_for_train_val_and_test(tmp_path):
    write_fake_cifar(tmp_path)
    for resident, workers in ((True, 4), (False, 0), (False, 2)):
        dm = CifarDataModule(root=str(tmp_path), download=False, batch_size=4, eval_batch_size=5, resident=resident,
                             num_workers=workers)
        dm.setup()
        for loader, size in ((dm.train_dataloader(), 4), (dm.val_dataloader(), 5), (dm.test_dataloader(), 5)):
            images, labels = dm.on_after_batch_transfer(next(iter(loader)), 0)
            assert images.shape == (size, 3, 32, 32) and labels.shape == (size,)
        test_labels = torch.cat([b.labels for b in dm.test_dataloader()])
        assert test_labels.tolist() == dm.test_set.labels.tolist()  # evaluation runs in order


@pytest.mark.parametrize("key, value, message", [
    ("limit_train", 0, "limit_train must be a positive integer or null, got 0"),
    ("num_workers", -1, "num_workers must be a non-negative integer, got -1"),
    ("batch_size", 0, "batch_size must be a positive integer, got 0"),
    ("dataset", "mnist", "dataset must be one of"),
])
def test_constructor_checks_its_values(tmp_path, key, value, message):
    with pytest.raises(ConfigError, match=message):
        CifarDataModule(root=str(tmp_path), **{key: value})


def _children() -> set:
    import multiprocessing

    return set(multiprocessing.active_children())


def test_training_workers_stop_when_the_loader_is_dropped_or_the_fit_ends(tmp_path):
    """The training batches' worker processes persist from epoch to epoch; they stop as soon as the loader is dropped
    (no reference cycle keeps it), and at the end of a fit, normal (the data module's ``teardown``) or stopped by an
    error (``on_exception``). Left to the garbage collector (Lightning's trainer lives in reference cycles), torch
    collected the loader's queues first and then waited 5 s for each worker before it killed it: 10 s in the middle
    of the next job of a sweep or trial of a search."""
    import gc

    import pytorch_lightning as pl

    from flgc_lightning.data.batches import PlanSampler, TrainBatches
    from flgc_lightning.training.module import ImageClassifier

    write_fake_cifar(tmp_path, per_file=8)
    dm = CifarDataModule(root=str(tmp_path), download=False, batch_size=4, eval_batch_size=8, resident=False,
                         num_workers=2)
    dm.setup()
    before = _children()
    batches = TrainBatches(dm.train_set, 4, PlanSampler(len(dm.train_set), 0, 4, True), {"num_workers": 2})
    epoch = iter(batches)
    next(epoch)  # an epoch left unfinished, as a stopped run leaves it
    workers = _children() - before
    assert len(workers) == 2
    gc.disable()  # dropped, not collected: freed by reference counting alone
    try:
        del epoch, batches
        assert not any(w.is_alive() for w in workers)
    finally:
        gc.enable()

    class Seen(pl.Callback):
        """The worker processes alive at each training batch (validation's come and go between epochs)."""

        def __init__(self, fail_at: int | None = None) -> None:
            self.by_epoch, self.fail_at = {}, fail_at

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.by_epoch.setdefault(trainer.current_epoch, set()).update(_children() - before)
            if trainer.current_epoch == self.fail_at:
                raise RuntimeError("disk full (simulated)")

    model = {"_target_": "flgc_lightning.models.MobileNetV2", "num_classes": 10, "groups": 2, "use_flgc": True,
             "width_mult": 0.25}
    for fail_at in (None, 1):
        seen = Seen(fail_at)
        trainer = pl.Trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=1, accelerator="cpu", logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             num_sanity_val_steps=0, callbacks=[seen])
        module = ImageClassifier(model, {"_target_": "torch.optim.SGD", "lr": 0.05}, None, (3, 32, 32))
        if fail_at is None:
            trainer.fit(module, datamodule=dm)
        else:
            with pytest.raises(RuntimeError, match="disk full"):
                trainer.fit(module, datamodule=dm)
        training = seen.by_epoch[0]  # before any validation: the training loader's two
        assert len(training) == 2 and training <= seen.by_epoch[1], fail_at  # and the same ones in the next epoch
        assert not any(w.is_alive() for epoch in seen.by_epoch.values() for w in epoch), fail_at  # while the trainer
        # (and its loaders) are still referenced here
