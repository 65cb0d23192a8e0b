"""What ``train.py`` does, as functions that tests and notebooks can call too."""
from __future__ import annotations

import logging
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from flgc_lightning.training.checkpoints import load_checkpoint
from flgc_lightning.training.module import ImageClassifier, plain
from flgc_lightning.training.validation import check_resume_compatible, resume_setting_changes, validate_config

log = logging.getLogger(__name__)


def _instantiate_all(group: Optional[DictConfig]) -> list[Any]:
    """Instantiate every ``_target_`` entry of a dict-of-configs group (callbacks, loggers)."""
    if not group:
        return []
    return [instantiate(entry) for entry in group.values() if isinstance(entry, DictConfig) and "_target_" in entry]


def build_datamodule(cfg: DictConfig) -> pl.LightningDataModule:
    return instantiate(cfg.data)


def build_module(cfg: DictConfig, datamodule: pl.LightningDataModule) -> ImageClassifier:
    """The LightningModule; class count and image channels come from the data when the model leaves them null."""
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    if model_cfg.get("num_classes") is None:
        model_cfg["num_classes"] = datamodule.num_classes
    if "in_channels" in model_cfg and model_cfg["in_channels"] is None:
        model_cfg["in_channels"] = datamodule.input_size[0]
    module = ImageClassifier(
        model=model_cfg,
        optimizer=plain(cfg.optimizer),
        scheduler=plain(cfg.scheduler) or None,
        input_size=tuple(datamodule.input_size),
        assign_optim=plain(cfg.get("assign_optim")),
    )
    module.run_config = plain(cfg)
    module.compile_network = bool(cfg.get("compile", False))
    return module


def build_trainer(cfg: DictConfig, **kwargs: Any) -> pl.Trainer:
    return instantiate(cfg.trainer, callbacks=_instantiate_all(cfg.get("callbacks")),
                       logger=_instantiate_all(cfg.get("logger")) or False, **kwargs)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit (or resume, with ``ckpt_path``) and return the final metrics.

    Everything a user can get wrong (config, checkpoint, data path) is checked before training starts.
    """
    validate_config(cfg)
    checkpoint = load_checkpoint(cfg.ckpt_path) if cfg.ckpt_path is not None else None
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()  # fail fast (missing data) before building anything heavy
    module = build_module(cfg, datamodule)
    if checkpoint is not None:
        check_resume_compatible(module.hparams.model, checkpoint, cfg.ckpt_path)
        changes = resume_setting_changes(module.run_config, checkpoint["flgc_config"])
        if changes:
            log.warning("resuming with settings that differ from the checkpoint's (the continuation will not "
                        "match an uninterrupted run):\n  - %s", "\n  - ".join(changes))
        del checkpoint  # Lightning reads the file again; don't hold two copies
    trainer = build_trainer(cfg)
    channels_last = cfg.get("channels_last", "auto")
    module.channels_last = trainer.strategy.root_device.type == "cuda" if channels_last == "auto" else bool(channels_last)
    log.info("run directory: %s", cfg.run_dir)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None and checkpoint.best_model_path:
        log.info("best checkpoint: %s (val/acc %.4f)", checkpoint.best_model_path, float(checkpoint.best_model_score))
        log.info("last checkpoint: %s", checkpoint.last_model_path)
        if cfg.get("test_after_fit"):
            trainer.test(module, datamodule=datamodule, ckpt_path=checkpoint.best_model_path)
            metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    return metrics
