"""Exponential moving average (EMA) of the weights: Lightning's own ``EMAWeightAveraging`` with checked arguments.

What Lightning's callback does, and why that is what this project needs:

- validation runs on the averaged weights (swapped in for the validation epoch, swapped back after), so
  ``val/acc``, the best checkpoint and ``test_after_fit`` all measure the averaged network;
- every checkpoint holds the averaged weights in ``state_dict`` and the raw training weights in
  ``current_model_state`` (plus ``averaging_state``: the update count). ``test.py``, the deploy step and
  ``predict.py`` read ``state_dict``, so they use the averaged weights with no extra code; FLGC group ids are
  then the argmax of the *averaged* assignment logits in all three, the same network everywhere;
- a resume restores the raw weights, the average and the update count, so a killed and resumed run ends with
  the same averaged and raw weights as an uninterrupted one (``tests/test_ema.py``). Lightning runs checkpoint
  callbacks after all others, so a step's checkpoint always includes that step's average update.

The assignment tracker still follows the raw training weights (how groups move while training).
"""
from __future__ import annotations

from typing import Any, Optional

import pytorch_lightning as pl
from pytorch_lightning.callbacks import EMAWeightAveraging
from pytorch_lightning.trainer.states import TrainerFn


class EMA(EMAWeightAveraging):
    """EMA of all parameters and buffers (BatchNorm statistics too), updated after optimizer steps.

    Args:
        decay: weight of the old average at each update, in (0, 1): the average spans about
            ``1 / (1 - decay)`` updates (0.999: the last ~1,000 steps).
        update_every_n_steps: update after every N-th optimizer step.
        update_starting_at_step: first optimizer step (0-based) that updates the average; null: the first.
        device: where the average lives (null: the model's device; ``cpu`` saves accelerator memory).
    """

    def __init__(self, decay: float = 0.999, update_every_n_steps: int = 1,
                 update_starting_at_step: Optional[int] = None, device: Optional[str] = None) -> None:
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be a number between 0 and 1 (exclusive), got {decay!r}")
        if isinstance(update_every_n_steps, bool) or not isinstance(update_every_n_steps, int) \
                or update_every_n_steps < 1:
            raise ValueError(f"update_every_n_steps must be a positive integer, got {update_every_n_steps!r}")
        if update_starting_at_step is not None and (not isinstance(update_starting_at_step, int)
                                                    or update_starting_at_step < 0):
            raise ValueError(f"update_starting_at_step must be a non-negative integer or null, "
                             f"got {update_starting_at_step!r}")
        super().__init__(device=device, use_buffers=True, decay=float(decay),
                         update_every_n_steps=update_every_n_steps, update_starting_at_step=update_starting_at_step)
        self.decay = float(decay)
        self._trained_state: Optional[dict[str, Any]] = None  # the raw weights, once training has ended

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Lightning copies the average into the module here (so what follows uses it). Keep the raw weights: a
        ``last.ckpt`` written after this (Lightning's ``ModelCheckpoint.on_train_end``, e.g. a resumed run without a
        new best) must still hold them in ``current_model_state``, or extending the run would train the average."""
        self._trained_state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self._trained_state is not None and "current_model_state" in checkpoint:
            checkpoint["current_model_state"] = self._trained_state

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._trained_state = None
        super().setup(trainer, pl_module, stage)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Restore the raw weights and the average only when training resumes. Lightning 2.6 calls this hook for
        ``trainer.test(ckpt_path=...)`` too, where the parent would put the raw weights back and ``test_after_fit``
        would test the raw network instead of the averaged one the checkpoint was selected for."""
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)


def has_averaged_weights(checkpoint: dict) -> bool:
    """Whether a checkpoint was written with weight averaging on (``state_dict`` then holds the average)."""
    return "current_model_state" in checkpoint and "averaging_state" in checkpoint
