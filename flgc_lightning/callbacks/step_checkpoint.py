"""``last.ckpt`` after every epoch and every N optimizer steps, for exact resume."""
from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint


class StepCheckpoint(ModelCheckpoint):
    """A ``ModelCheckpoint`` that keeps ``last.ckpt`` current: at the end of every epoch
    (after validation) and every ``every_n_train_steps`` steps, except on an epoch's last batch.

    - Lightning 2.6 refreshes ``last.ckpt`` at epoch end only when a top-k checkpoint was
      saved at the same step, so without the epoch-end save ``last.ckpt`` goes stale after
      any epoch that is not a new best.
    - Lightning treats a checkpoint written at the end of an epoch's last batch as a finished
      epoch: a resume from it skips that epoch's validation and epoch-end hooks (metrics,
      assignment records, best-checkpoint selection). The epoch-end save follows that batch
      moments later, so skipping it loses nothing and keeps resume exact.
    """

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
