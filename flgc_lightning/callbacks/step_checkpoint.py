"""``last.ckpt`` every N optimizer steps, for exact mid-epoch resume."""
from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint


class StepCheckpoint(ModelCheckpoint):
    """A ``ModelCheckpoint`` that refreshes ``last.ckpt`` every ``every_n_train_steps`` steps,
    except on an epoch's last batch.

    Lightning treats a checkpoint written at the end of an epoch's last batch as a finished
    epoch: a resume from it skips that epoch's validation and epoch-end hooks (metrics,
    assignment records, best-checkpoint selection). The epoch-end checkpoint follows that
    batch moments later, so skipping it loses nothing and keeps resume exact.
    """

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
