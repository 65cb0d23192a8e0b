"""What every image-classification DataModule here shares: seeded, resumable loaders.

Subclasses fill ``train_set`` / ``test_set`` in ``setup`` and define ``num_classes`` and
``input_size``; this base builds the loaders. The training data a run sees depends only on
``(seed, epoch, index)``, and checkpoints record how far into the epoch it got, so a resumed
run continues exactly (see :mod:`flgc_lightning.data.sampling`).
"""
from __future__ import annotations

from typing import Optional

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from flgc_lightning.data.sampling import EpochSampler, SeededAugmentation


class ImageClassificationDataModule(pl.LightningDataModule):
    """Loaders for ``train_set`` (shuffled, seeded augmentation) and ``test_set`` (also the validation split)."""

    def __init__(
        self,
        batch_size: int = 128,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 4,
        pin_memory: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.seed = seed
        self.train_set: Optional[Dataset] = None
        self.test_set: Optional[Dataset] = None
        self._resume: Optional[dict] = None
        self._train_sampler: Optional[EpochSampler] = None

    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    @property
    def input_size(self) -> tuple[int, int, int]:
        raise NotImplementedError

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        sampler = None  # evaluation: in order (Lightning adds a DistributedSampler under DDP)
        if train:
            sampler = EpochSampler(len(dataset), shuffle=True, seed=self.seed)
            dataset = SeededAugmentation(dataset, self.seed)
            if self._resume is not None:  # continue mid-epoch exactly where the checkpoint left off
                sampler.skip_in_epoch(self._resume["epoch"], self._resume["samples_done"])
                self._resume = None
            self._train_sampler = sampler
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def state_dict(self) -> dict:
        """Where the training data stream stands; Lightning saves it in every checkpoint."""
        trainer, sampler = getattr(self, "trainer", None), self._train_sampler
        if trainer is None or sampler is None:
            return {}
        batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": int(sampler.epoch), "samples_done": int(batches * self.batch_size)}

    def load_state_dict(self, state_dict: dict) -> None:
        self._resume = dict(state_dict) if state_dict else None

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)
