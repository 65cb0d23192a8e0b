"""What every image-classification DataModule here shares: batches planned per epoch, augmented on the device.

Subclasses load their splits as uint8 images (:meth:`load_splits`) and say how to normalise and
augment them; this base holds out a validation split if asked, builds the batch iterables
(:mod:`flgc_lightning.data.batches`) and applies the reference augmentation to whole batches on
the training device after Lightning has moved them there (:meth:`on_after_batch_transfer`).

Exact resume: the training data of a run depends only on ``(seed, epoch, position)``, and every
checkpoint records which epoch was in progress and how many of its batches were trained
(:meth:`state_dict`), so a resumed run trains on exactly the batches an uninterrupted run would.
"""
from __future__ import annotations

import logging
import warnings
from typing import Optional, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import Dataset, Subset

from flgc_lightning.data.augment import BatchTransform, ImageBatch
from flgc_lightning.data.batches import EvalBatches, PlanSampler, ResidentImages, TrainBatches
from flgc_lightning.errors import ConfigError

log = logging.getLogger(__name__)

# Lightning warns on a mid-epoch resume unless the loader object itself has state_dict(); here the
# DataModule's own state_dict restores the position (tests/test_resume.py), so the warning is false.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")

RESIDENT_SHARE = 0.5  # a resident split may take at most this share of the device's free memory


def check_positive(name: str, value: Optional[int], allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer{' or null' if allow_none else ''}, got {value!r}")


def stratified_holdout(labels: np.ndarray, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(kept, held_out)`` index arrays: ``size`` images held out with the class proportions of ``labels``."""
    from sklearn.model_selection import train_test_split

    if size >= len(labels):
        raise ConfigError(f"data.val_size={size} leaves no training images (the training split has {len(labels)})")
    counts = np.bincount(labels)
    stratify = labels if size >= np.count_nonzero(counts) and counts[counts > 0].min() >= 2 else None
    kept, held = train_test_split(np.arange(len(labels)), test_size=size, random_state=seed, stratify=stratify)
    return np.sort(kept), np.sort(held)


class ImageClassificationDataModule(pl.LightningDataModule):
    """Batches for ``train`` (shuffled, augmented), ``val`` (held out, or the test split) and ``test``.

    Args:
        batch_size / eval_batch_size: training / evaluation batch size (eval defaults to training's).
        resident: keep each split as one uint8 tensor on the training device and cut batches there
            (no worker processes). Falls back to the loader path, with a warning, when a split would
            take more than half of the device's free memory.
        num_workers / pin_memory: the loader path only (``resident: false``, or image files): worker
            processes that read (decode) images; augmentation still happens on the device.
        seed: the data order and the augmentation of every epoch derive from it.
        val_size: hold out this many training images (stratified, ``val_seed``) as the validation
            split; the best checkpoint is then chosen on them. ``null``: validate on the test split,
            as the reference does.
        limit_train / limit_test: use only the first N training / test images (quick checks).
        augment: random crops and flips of training batches (false: none, e.g. ``debug=overfit``, which asks
            whether the network can fit a few fixed images).
    """

    def __init__(
        self,
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
        super().__init__()
        check_positive("batch_size", batch_size, allow_none=False)
        check_positive("eval_batch_size", eval_batch_size)
        check_positive("val_size", val_size)
        check_positive("limit_train", limit_train)
        check_positive("limit_test", limit_test)
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigError(f"num_workers must be a non-negative integer, got {num_workers!r}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.seed, self.resident = seed, resident
        self.val_size, self.val_seed = val_size, val_seed
        self.limit_train, self.limit_test = limit_train, limit_test
        self.augment = augment
        self.train_set: Optional[Dataset] = None
        self.val_set: Optional[Dataset] = None
        self.test_set: Optional[Dataset] = None
        self.transform: Optional[BatchTransform] = None
        self._sampler: Optional[PlanSampler] = None
        self._train_batches: Optional[TrainBatches] = None
        self._resume: Optional[dict] = None

    # -- what subclasses provide -----------------------------------------------------------
    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    @property
    def input_size(self) -> tuple[int, int, int]:
        raise NotImplementedError

    def load_splits(self) -> tuple[Dataset, Dataset]:
        """``(train, test)``: :class:`ResidentImages`, or map-style datasets of ``(uint8 C x H x W, label)``."""
        raise NotImplementedError

    def labels_of(self, split: Dataset) -> np.ndarray:
        return split.labels.cpu().numpy()

    def normalization(self, train: Dataset) -> tuple[Sequence[float], Sequence[float]]:
        raise NotImplementedError

    @property
    def hflip(self) -> bool:
        return True

    @property
    def class_names(self) -> Optional[list[str]]:
        """Names of the classes in label order, where the data has them."""
        return None

    def preprocessing(self) -> dict:
        """What inference needs to feed an image to the network as evaluation does: size, channels, normalisation
        and class names. Recorded in every checkpoint (``flgc_preprocessing``) and beside deployed files, so
        ``predict.py`` needs neither the training data nor its config."""
        if self.transform is None:
            self.setup()
        channels, height, width = self.input_size
        return {"channels": int(channels), "height": int(height), "width": int(width),
                "mean": [float(m) for m in self.transform.mean], "std": [float(s) for s in self.transform.std],
                "classes": self.class_names}

    @property
    def crop_padding(self) -> int:
        """Reference: pad 4 on 32 px, i.e. size / 8."""
        return max(1, self.input_size[1] // 8)

    # -- splits ----------------------------------------------------------------------------
    @property
    def validation_is_test(self) -> bool:
        """True in the reference setting: the test split doubles as validation (model selection on test)."""
        return self.val_size is None

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        train, test = self.load_splits()
        if self.val_size is not None:
            kept, held = stratified_holdout(self.labels_of(train), self.val_size, self.val_seed)
            train, self.val_set = _subset(train, kept), _subset(train, held)
        self.train_set = _subset(train, self.limited(len(train), self.limit_train))
        self.test_set = _subset(test, self.limited(len(test), self.limit_test))
        if self.val_set is None:
            self.val_set = self.test_set
        mean, std = self.normalization(self.train_set)
        self.transform = BatchTransform(mean, std, self._augmentation()[0])

    def _augmentation(self) -> tuple[int, bool]:
        """Crop padding and whether to flip: the data's own, or none without augmentation (padding 0 = no crop)."""
        return (self.crop_padding, self.hflip) if self.augment else (0, False)

    def limited(self, length: int, limit: Optional[int]) -> np.ndarray:
        """Indices kept by ``limit_train`` / ``limit_test``: the first N."""
        return np.arange(min(length, limit or length))

    # -- batches ---------------------------------------------------------------------------
    def _device(self, split: Optional[Dataset] = None) -> torch.device:
        """The trainer's device; without a trainer (scripts, benchmarks) wherever the resident split already is."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.strategy.root_device
        return split.images.device if isinstance(split, ResidentImages) else torch.device("cpu")

    def _placed(self, split: Dataset) -> tuple[Dataset, Optional[dict]]:
        """The split on the device (``loader_options`` None) or behind worker processes."""
        device = self._device(split)
        if self.resident and isinstance(split, ResidentImages):
            if device.type != "cuda" or split.nbytes <= RESIDENT_SHARE * torch.cuda.mem_get_info(device)[0]:
                return split.to(device), None
            log.warning("data: %.0f MB would take over half of %s's free memory; reading batches with "
                        "%d worker processes instead", split.nbytes / 2**20, device, self.num_workers)
        return split, {"num_workers": self.num_workers,
                       "pin_memory": self.pin_memory and device.type == "cuda"}

    def train_dataloader(self) -> TrainBatches:
        source, options = self._placed(self.train_set)
        self._sampler = PlanSampler(len(source), self.seed, *self._augmentation())
        if self._resume is not None:  # continue mid-epoch exactly where the checkpoint left off
            self._sampler.skip_in_epoch(self._resume["epoch"], self._resume["batches_done"] * self.batch_size)
        self._close_train_batches()  # a reloaded loader replaces the last one's workers
        self._train_batches = TrainBatches(source, self.batch_size, self._sampler, options)
        return self._train_batches

    def teardown(self, stage: str) -> None:
        """Lightning's last hook of a fit (validate, test) that ended normally: the training batches' worker
        processes stop here, not whenever the garbage collector finds them (:meth:`TrainBatches.close`)."""
        self._close_train_batches()

    def on_exception(self, exception: BaseException) -> None:
        """A fit stopped by an error or a signal (Lightning then skips ``teardown``): its workers stop too."""
        self._close_train_batches()

    def _close_train_batches(self) -> None:
        if self._train_batches is not None:
            self._train_batches.close()
            self._train_batches = None

    def _eval_batches(self, split: Dataset) -> EvalBatches:
        source, options = self._placed(split)
        return EvalBatches(source, self.eval_batch_size, options)

    def val_dataloader(self) -> EvalBatches:
        return self._eval_batches(self.val_set)

    def test_dataloader(self) -> EvalBatches:
        return self._eval_batches(self.test_set)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Augment (training) and normalise on the device the batch now lives on."""
        if isinstance(batch, ImageBatch):
            return self.transform(batch)
        return batch

    # -- resume ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Which epoch's batches were being trained and how many of them are done; in every checkpoint."""
        trainer, sampler = getattr(self, "trainer", None), self._sampler
        if trainer is None or sampler is None or sampler.active_epoch is None:
            return dict(self._resume or {})
        batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": int(sampler.active_epoch), "batches_done": int(batches)}

    def load_state_dict(self, state_dict: dict) -> None:
        self._resume = dict(state_dict) if state_dict else None
        if self._resume and "batches_done" not in self._resume:  # written before batches were planned per epoch
            log.warning("checkpoint from an older data pipeline: its data order cannot be continued exactly")
            self._resume["batches_done"] = int(self._resume.get("samples_done", 0)) // self.batch_size


def _subset(split: Dataset, index: np.ndarray) -> Dataset:
    """The images at ``index``: a smaller :class:`ResidentImages` (a copy, so batches stay one gather), else a Subset."""
    if len(index) == len(split) and np.array_equal(index, np.arange(len(split))):
        return split
    if isinstance(split, ResidentImages):
        index_t = torch.as_tensor(index, dtype=torch.long)
        return ResidentImages(split.images[index_t], split.labels[index_t])
    return Subset(split, index.tolist())
