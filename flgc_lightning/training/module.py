"""The LightningModule: a classifier built from config dicts, trained with the reference recipe."""
from __future__ import annotations

from typing import Any, Optional

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_info
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from flgc_lightning.errors import NonFiniteLossError
from flgc_lightning.utils.complexity import complexity_summary, format_millions


def plain(cfg: Any) -> Any:
    """Config -> plain Python containers, so checkpoints load with ``torch.load(weights_only=True)``."""
    if isinstance(cfg, DictConfig) or OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


class ImageClassifier(pl.LightningModule):
    """Wraps a network given as a Hydra config (``_target_`` + kwargs).

    Hyperparameters are stored as plain dicts, so ``ImageClassifier.load_from_checkpoint``
    rebuilds the exact network (groups, FLGC or not, width...) without the original config.

    Args:
        model: network config, e.g. ``{"_target_": "flgc_lightning.models.MobileNetV2", ...}``.
        optimizer: optimizer config; ``params`` is filled in (SGD 0.1/0.9/4e-5 in the reference).
        scheduler: LR scheduler config stepped once per epoch, or ``None``.
        input_size: C x H x W of one image, used for MAC counts.
    """

    def __init__(
        self,
        model: dict,
        optimizer: dict,
        scheduler: Optional[dict] = None,
        input_size: tuple[int, int, int] = (3, 32, 32),
    ) -> None:
        super().__init__()
        self.save_hyperparameters({
            "model": plain(model), "optimizer": plain(optimizer), "scheduler": plain(scheduler),
            "input_size": list(input_size),
        })
        self.net = instantiate(self.hparams.model)
        num_classes = self.hparams.model["num_classes"]
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.train_loss, self.val_loss, self.test_loss = MeanMetric(), MeanMetric(), MeanMetric()
        self.complexity: dict[str, int] = {}
        # Full composed run config; saved into every checkpoint (see on_save_checkpoint).
        self.run_config: Optional[dict] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch, loss_metric: MeanMetric, acc_metric: MulticlassAccuracy) -> torch.Tensor:
        images, targets = batch
        logits = self(images)
        loss = F.cross_entropy(logits, targets)
        loss_metric.update(loss.detach(), weight=targets.numel())
        acc_metric.update(logits.detach(), targets)
        return loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self._step(batch, self.train_loss, self.train_acc)
        if not torch.isfinite(loss):  # stop before the optimizer writes NaNs into the weights
            raise NonFiniteLossError(
                f"training loss is {loss.item()} at global step {self.global_step} "
                f"(epoch {self.current_epoch}, batch {batch_idx}); the run stopped and the last good "
                "checkpoint was kept. Lower optimizer.lr or check the data."
            )
        self.log("train/loss", self.train_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, self.val_loss, self.val_acc)
        self.log("val/loss", self.val_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("val/acc", self.val_acc, on_step=False, on_epoch=True, prog_bar=True)

    def test_step(self, batch, batch_idx: int) -> None:
        self._step(batch, self.test_loss, self.test_acc)
        self.log("test/loss", self.test_loss, on_step=False, on_epoch=True)
        self.log("test/acc", self.test_acc, on_step=False, on_epoch=True)

    def configure_optimizers(self):
        optimizer = instantiate(self.hparams.optimizer, params=self.parameters())
        if not self.hparams.scheduler:
            return optimizer
        scheduler = instantiate(self.hparams.scheduler, optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def on_fit_start(self) -> None:
        self.complexity = complexity_summary(self.net, tuple(self.hparams.input_size))
        if self.trainer.is_global_zero:
            rank_zero_info(
                "model: " + ", ".join(f"{k}={format_millions(v)}" for k, v in self.complexity.items())
            )
            for logger in self.loggers:
                logger.log_metrics({f"model/{k}": float(v) for k, v in self.complexity.items()}, step=0)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.run_config is not None:
            checkpoint["flgc_config"] = self.run_config
