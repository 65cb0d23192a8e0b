"""``last.ckpt`` after every epoch, every N optimizer steps and when a run is stopped, for exact resume."""
from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException


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
    - When a run is stopped at a step boundary (SIGTERM, Ctrl-C, SLURM requeue: see
      :class:`~flgc_lightning.callbacks.Preemption`) it writes ``last.ckpt`` there, so the stop loses no step.
    """

    stopped_checkpoint: str = ""  # last.ckpt written by the stop, for the message

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Lightning raises SIGTERMException at a step boundary (after a complete training step, or after an
        epoch's validation): the state there resumes exactly. Mid-validation or in the sanity check, the
        previous ``last.ckpt`` stays."""
        if not isinstance(exception, SIGTERMException) or trainer.sanity_checking or trainer.validating \
                or not trainer.training or trainer.global_step == 0:
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self.stopped_checkpoint = self.last_model_path
