"""The LightningModule: a classifier built from config dicts, trained with the reference recipe.

The training step never waits for the device: metrics skip their value checks, and the
non-finite-loss check records the first bad step on the device and is read on the host only
every ``log_every_n_steps`` steps and before every checkpoint is written (so no checkpoint ever
holds weights updated by a non-finite loss).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_info
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from flgc_lightning.errors import ConfigError, NonFiniteLossError
from flgc_lightning.layers.flgc import Flgc2d
from flgc_lightning.layers.regroup import apply_groups, propose_groups
from flgc_lightning.training.assign_schedule import AssignSchedule, refresh_assignment_noise
from flgc_lightning.training.cuda_graphs import GraphedTraining
from flgc_lightning.training.file_config import TRUSTED, check_checkpoint, check_hparams
from flgc_lightning.training.schema import construct_checked, instantiate_checked
from flgc_lightning.utils.complexity import complexity_summary, format_millions
from flgc_lightning.utils.inductor import pin_cpu_vector_width

# Every assign_optim key and its default; old checkpoints' hyperparameters lack the schedule keys.
ASSIGN_OPTIM_DEFAULTS = {"lr_mult": 1.0, "weight_decay": None, **dataclasses.asdict(AssignSchedule()),
                         "regroup_epochs": []}


def plain(cfg: Any) -> Any:
    """Config -> plain Python containers, so checkpoints load with ``torch.load(weights_only=True)``."""
    if isinstance(cfg, DictConfig) or OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


class ImageClassifier(pl.LightningModule):
    """Wraps a network given as a Hydra config (``_target_`` + kwargs).

    Hyperparameters are stored as plain dicts, so ``ImageClassifier.load_from_checkpoint``
    rebuilds the exact network (groups, FLGC or not, width...) without the original config, from
    allowed classes only (``config_origin``).

    Args:
        model: network config, e.g. ``{"_target_": "flgc_lightning.models.MobileNetV2", ...}``.
        optimizer: optimizer config; ``params`` is filled in (SGD 0.1/0.9/4e-5 in the reference).
        scheduler: LR scheduler config stepped once per epoch, or ``None``.
        input_size: C x H x W of one image, used for MAC counts.
        assign_optim: how the optimizer treats FLGC assignment logits: ``lr_mult`` (their
            learning rate is ``optimizer.lr * lr_mult``) and ``weight_decay`` (``None``: the
            optimizer's). The reference treats them like every other parameter (1.0, ``None``).
            Also when they learn and the Gumbel temperature (:class:`AssignSchedule`'s keys): frozen
            epochs drop the logits' gradients before the optimizer step, so SGD neither moves nor
            decays them (``requires_grad`` stays, which DDP's reducer and compiled graphs need).
        config_origin: where ``model``/``optimizer``/``scheduler`` come from, for messages (default: a file's
            hyperparameters, as ``load_from_checkpoint`` passes them). Configs are built only from classes a file
            may name (:mod:`flgc_lightning.training.file_config`) unless it is ``TRUSTED``: configs the user
            composed (``train.py`` passes it). Not a hyperparameter; a file cannot hold ``TRUSTED``.
    """

    def __init__(
        self,
        model: dict,
        optimizer: dict,
        scheduler: Optional[dict] = None,
        input_size: tuple[int, int, int] = (3, 32, 32),
        assign_optim: Optional[dict] = None,
        config_origin: Any = "hyperparameters given to ImageClassifier",
    ) -> None:
        super().__init__()
        if config_origin is not TRUSTED:  # Lightning's load_from_checkpoint hands us a file's configs: the optimizer
            # and scheduler ones are built later (configure_optimizers), so all are checked now
            check_hparams({"model": plain(model), "optimizer": plain(optimizer), "scheduler": plain(scheduler),
                           "input_size": list(input_size), "assign_optim": plain(assign_optim)}, str(config_origin))
        self._checkpoint_source = "checkpoint" if config_origin is TRUSTED else str(config_origin)
        assign_optim = {**ASSIGN_OPTIM_DEFAULTS, **(plain(assign_optim) or {})}
        if not assign_optim["lr_mult"] >= 0:
            raise ConfigError(f"invalid configuration:\n  - assign_optim.lr_mult must be >= 0, got {assign_optim['lr_mult']!r}")
        if assign_optim["weight_decay"] is not None and not assign_optim["weight_decay"] >= 0:
            raise ConfigError("invalid configuration:\n  - assign_optim.weight_decay must be >= 0 or null, got "
                              f"{assign_optim['weight_decay']!r}")
        self.assign_schedule = construct_checked(lambda: AssignSchedule.from_options(assign_optim), "assign_optim",
                                                 "flgc_lightning.training.assign_schedule.AssignSchedule")
        self.save_hyperparameters({
            "model": plain(model), "optimizer": plain(optimizer), "scheduler": plain(scheduler),
            "input_size": list(input_size), "assign_optim": assign_optim,
        })
        self.net = instantiate_checked(self.hparams.model, "model")
        num_classes = self.hparams.model["num_classes"]
        # No argument validation / NaN checks in the metrics: each would wait for the device every step.
        accuracy = dict(num_classes=num_classes, average="micro", validate_args=False)
        self.train_acc, self.val_acc, self.test_acc = (MulticlassAccuracy(**accuracy) for _ in range(3))
        self.train_loss, self.val_loss, self.test_loss = (MeanMetric(nan_strategy="disable") for _ in range(3))
        self.complexity: dict[str, int] = {}
        # Full composed run config; saved into every checkpoint (see on_save_checkpoint).
        self.run_config: Optional[dict] = None
        # Runtime options (not hyperparameters: test.py and deploy rebuild the network without them).
        self.channels_last = False
        self.compile_network: bool | str = False  # True or a torch.compile mode ("reduce-overhead": CUDA graphs)
        self.cuda_graphs = False  # training forward/backward replayed from CUDA graphs (training/cuda_graphs.py)
        self.run_seed = 0  # the run's seed (train.py sets it): Gumbel noise derives from it and the step
        self._graphed: Optional[GraphedTraining] = None
        self._first_nonfinite: Optional[torch.Tensor] = None  # device scalar: first step with a bad loss, or -1
        self._flgc: Optional[list[tuple[int, Flgc2d]]] = None

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args, **kwargs):
        """Lightning's ``load_from_checkpoint``; the file's configs are checked before anything is built."""
        kwargs.setdefault("config_origin", f"checkpoint '{checkpoint_path}'")
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self._graphed is not None:
            return self._graphed(x)
        return self.net(x)

    def _step(self, batch, loss_metric: MeanMetric, acc_metric: MulticlassAccuracy) -> torch.Tensor:
        images, targets = batch
        logits = self(images)
        loss = F.cross_entropy(logits, targets)
        # The weight as a tensor made on the device: a Python int becomes a blocking host-to-device copy inside
        # MeanMetric (one host sync per step, seen on an H200 with torch.cuda.set_sync_debug_mode).
        loss_metric.update(loss.detach(), weight=loss.detach().new_full((), targets.numel()))
        acc_metric.update(logits.detach(), targets)
        return loss

    # -- non-finite loss: recorded on the device, checked at host sync points ----------------
    def _record_nonfinite(self, loss: torch.Tensor) -> None:
        if self._first_nonfinite is None or self._first_nonfinite.device != loss.device:
            self._first_nonfinite = torch.full((), -1, dtype=torch.long, device=loss.device)
        bad = ~torch.isfinite(loss.detach()) & (self._first_nonfinite < 0)
        self._first_nonfinite = torch.where(bad, self.global_step, self._first_nonfinite)

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteLossError` if any training loss so far was NaN/inf (one host sync)."""
        if self._first_nonfinite is None:
            return
        step = int(self._first_nonfinite)
        if step >= 0:
            raise NonFiniteLossError(
                f"training loss is not finite at global step {step}; the run stopped and no checkpoint was written "
                "after that step (the last one on disk is from before it). Lower optimizer.lr or check the data."
            )

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self._step(batch, self.train_loss, self.train_acc)
        self._record_nonfinite(loss)
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

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if (batch_idx + 1) % max(1, self.trainer.log_every_n_steps) == 0:
            self.check_finite()

    def on_train_epoch_end(self) -> None:
        self.check_finite()

    # -- assignment schedule: host ints only (epoch, step, seed), so no sync and an exact resume ------
    def _flgc_layers(self) -> list[tuple[int, Flgc2d]]:
        """``(index in module order, layer)`` of every FLGC layer (found once: the network never changes)."""
        if self._flgc is None:
            self._flgc = list(enumerate(m for m in self.net.modules() if isinstance(m, Flgc2d)))
        return self._flgc

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # batch_idx is 0 once per epoch: a resume inside an epoch continues its count and does not regroup again
        if batch_idx == 0 and self.assign_schedule.regroups(self.current_epoch):
            self.regroup()
        gumbel = [(i, m) for i, m in self._flgc_layers() if m.assign_grad == "gumbel"]
        if gumbel:
            refresh_assignment_noise(gumbel, self.assign_schedule, self.run_seed, self.global_step,
                                     self.current_epoch, self.trainer.max_epochs)

    def regroup(self) -> None:
        """Co-cluster every learning FLGC layer's ``|W|`` into new groups (one host sync per layer). Under DDP
        rank 0's proposal is used everywhere, so the ranks cannot disagree on the groups."""
        layers = [m for _, m in self._flgc_layers() if m.learn_assignments]
        proposals = [propose_groups(m, seed=self.run_seed % 2**32) for m in layers]
        proposals = self.trainer.strategy.broadcast(proposals, src=0)
        moved = sum(apply_groups(m, *p) for m, p in zip(layers, proposals))
        rank_zero_info(f"epoch {self.current_epoch}: regrouped {len(layers)} FLGC layers by co-clustering |W|, "
                       f"{moved} channels changed group")

    def on_before_optimizer_step(self, optimizer) -> None:
        if not self.assign_schedule.learning(self.current_epoch):
            for _, layer in self._flgc_layers():
                layer.in_assign.grad = layer.out_assign.grad = None

    def parameter_groups(self) -> list[dict] | Any:
        """All parameters in one group, as the reference does, unless ``assign_optim`` treats the
        FLGC assignment logits differently: then they form a second group."""
        lr_mult, decay = self.hparams.assign_optim["lr_mult"], self.hparams.assign_optim["weight_decay"]
        assign = [p for n, p in self.named_parameters() if n.endswith((".in_assign", ".out_assign"))]
        if not assign or (lr_mult == 1.0 and decay is None):
            return self.parameters()
        ids = {id(p) for p in assign}
        group = {"params": assign, "lr": self.hparams.optimizer["lr"] * lr_mult}
        if decay is not None:
            group["weight_decay"] = decay
        return [{"params": [p for p in self.parameters() if id(p) not in ids]}, group]

    def configure_optimizers(self):
        # _convert_="all": without it Hydra hands parameter groups (a list of dicts) to the optimizer as DictConfigs.
        optimizer = instantiate_checked(self.hparams.optimizer, "optimizer", params=self.parameter_groups(),
                                        _convert_="all")
        if not self.hparams.scheduler:
            return optimizer
        scheduler = instantiate_checked(self.hparams.scheduler, "scheduler", optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def on_fit_start(self) -> None:
        self.complexity = complexity_summary(self.net, tuple(self.hparams.input_size))
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)
        if self.cuda_graphs:
            if self.device.type != "cuda" or self.trainer.world_size > 1 or self.compile_network:
                raise ConfigError("invalid configuration:\n  - cuda_graphs=true needs one CUDA device (trainer=gpu, "
                                  f"not DDP) and compile=false; here: device {self.device.type}, "
                                  f"{self.trainer.world_size} process(es), compile={self.compile_network}")
            self._graphed = GraphedTraining(self.net)
        if self.compile_network:  # in place: parameter names (checkpoints) stay those of the plain network
            mode = None if self.compile_network is True else str(self.compile_network)
            if self.device.type == "cpu":  # inductor's cache keyed by this CPU's vector width (utils/inductor.py)
                pin_cpu_vector_width()
            self.net.compile(mode=None if mode == "default" else mode)
        if self.trainer.is_global_zero:
            rank_zero_info(
                "model: " + ", ".join(f"{k}={format_millions(v)}" for k, v in self.complexity.items())
            )
            for logger in self.loggers:
                logger.log_metrics({f"model/{k}": float(v) for k, v in self.complexity.items()}, step=0)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A checkpoint read by Lightning (``load_from_checkpoint``, a resume) gets the checks of every checkpoint
        this program reads: one whose run config names code outside the allow-list is refused."""
        hparams = checkpoint.get("hyper_parameters")
        if isinstance(hparams, dict) and "config_origin" in hparams:  # load_from_checkpoint's own argument, which
            # Lightning copies into the hyperparameters it read (only TRUSTED would count, and no file holds that)
            checkpoint = {**checkpoint, "hyper_parameters": {k: v for k, v in hparams.items() if k != "config_origin"}}
        check_checkpoint(checkpoint, self._checkpoint_source)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.check_finite()  # never write weights that a non-finite loss has touched
        if self.run_config is not None:
            checkpoint["flgc_config"] = self.run_config
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if getattr(datamodule, "transform", None) is not None and hasattr(datamodule, "preprocessing"):
            checkpoint["flgc_preprocessing"] = datamodule.preprocessing()  # for predict.py (plain types)
