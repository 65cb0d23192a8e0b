"""What ``train.py`` does, as functions that tests and notebooks can call too."""
from __future__ import annotations

import json
import logging
import signal
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities.exceptions import SIGTERMException

from flgc_lightning.callbacks import Preemption, StepCheckpoint
from flgc_lightning.errors import ConfigError, Stopped, UserError
from flgc_lightning.trackers import attach_run_config
from flgc_lightning.training.checkpoints import load_checkpoint
from flgc_lightning.training.file_config import TRUSTED
from flgc_lightning.training.module import ImageClassifier, plain
from flgc_lightning.training.schema import instantiate_checked
from flgc_lightning.training.validation import (check_resume_averaging, check_resume_compatible, resume_setting_changes,
                                                validate_config)

log = logging.getLogger(__name__)


def _instantiate_all(cfg: DictConfig, key: str) -> list[Any]:
    """Instantiate every ``_target_`` entry of a dict-of-configs group (``callbacks``, ``logger``)."""
    group = cfg.get(key)
    if not group:
        return []
    return [instantiate_checked(entry, f"{key}.{name}") for name, entry in group.items()
            if isinstance(entry, DictConfig) and "_target_" in entry]


def build_datamodule(cfg: DictConfig) -> pl.LightningDataModule:
    return instantiate_checked(cfg.data, "data")


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
        config_origin=TRUSTED,  # composed by the user (conf/ + command line), not read from a file
    )
    module.run_config = plain(cfg)
    module.compile_network = cfg.get("compile", False)
    module.cuda_graphs = bool(cfg.get("cuda_graphs", False))
    module.run_seed = int(cfg.seed)
    return module


def build_trainer(cfg: DictConfig, **kwargs: Any) -> pl.Trainer:
    try:
        return instantiate_checked(cfg.trainer, "trainer", callbacks=_instantiate_all(cfg, "callbacks"),
                                   logger=_instantiate_all(cfg, "logger") or False, **kwargs)
    except ConfigError as err:
        if str(cfg.trainer.get("accelerator")) in ("gpu", "cuda") and not torch.cuda.is_available():
            raise ConfigError(f"{err} (trainer.accelerator={cfg.trainer.accelerator}, but torch sees no CUDA GPU "
                              "here; use trainer=cpu, or trainer.accelerator=auto)") from None
        raise


def _summary(cfg: DictConfig) -> dict:
    path = OmegaConf.select(cfg, "callbacks.run_summary.path")
    try:
        return json.loads(Path(path).read_text()) if path else {}
    except (OSError, ValueError):
        return {}


def _last_checkpoint(cfg: DictConfig) -> Optional[Path]:
    """``last.ckpt`` of the checkpoint callbacks' folder (``<run dir>/checkpoints``), if the run directory has one."""
    for key in ("callbacks.step_checkpoint.dirpath", "callbacks.model_checkpoint.dirpath"):
        folder = OmegaConf.select(cfg, key)
        if folder and (Path(folder) / "last.ckpt").is_file():
            return Path(folder) / "last.ckpt"
    return None


def continue_in_place(cfg: DictConfig) -> Optional[dict]:
    """A run directory that already holds this run (a sweep started again, a requeued job): if the run
    finished, its results are kept and returned; if it has a ``last.ckpt``, training continues from it."""
    if cfg.ckpt_path is not None:
        return None
    summary = _summary(cfg)
    if summary.get("status") == "finished":
        return summary
    last = _last_checkpoint(cfg)
    if last is not None:
        log.info("the run directory already holds this run: continuing from %s", last)
        cfg.ckpt_path = str(last)
    return None


def _finished(cfg: DictConfig, summary: dict) -> dict[str, float]:
    log.info("run in %s already finished (%s epochs): results kept, nothing to do", cfg.run_dir,
             summary.get("epochs_done"))
    if cfg.get("test_after_fit") and summary.get("test_acc") is None and summary.get("best_epoch") is not None:
        return _test_best(cfg)  # stopped between training and its test: test now
    return {k: float(v) for k, v in (("val/acc", summary.get("last_val_acc")), ("test/acc", summary.get("test_acc")))
            if v is not None}


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit (or resume) and return the final metrics.

    Resumes from ``ckpt_path``, or, without one, from the run directory's own ``last.ckpt``: running
    the same command again (a killed sweep, a requeued job) continues where it stopped, and a run
    that finished is skipped. Everything a user can get wrong (config, checkpoint, data path) is
    checked before training starts.
    """
    validate_config(cfg)
    finished = continue_in_place(cfg)
    if finished is not None:
        return _finished(cfg, finished)
    checkpoint = load_checkpoint(cfg.ckpt_path) if cfg.ckpt_path is not None else None
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    pl.seed_everything(cfg.seed, workers=True)
    trainer = build_trainer(cfg)  # first: an unavailable accelerator is a config error, found in a second
    if cfg.get("cuda_graphs") and (trainer.strategy.root_device.type != "cuda" or trainer.world_size > 1
                                   or cfg.get("compile")):
        raise ConfigError("invalid configuration:\n  - cuda_graphs=true needs one CUDA device (trainer=gpu, not DDP) "
                          f"and compile=false; here: {trainer.strategy.root_device.type}, {trainer.world_size} "
                          f"process(es), compile={cfg.get('compile')}")
    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()  # fail fast (missing data) before building anything heavy
    module = build_module(cfg, datamodule)
    if checkpoint is None and getattr(module.net, "groups_from", None):  # a resume has the groups in its weights
        from flgc_lightning.assignments.transfer import transfer_groups

        transfer_groups(module.net, module.net.groups_from, module.net.groups_shuffle, int(cfg.seed))
        log.info("FLGC groups from %s%s, frozen", module.net.groups_from,
                 ", shuffled (sizes kept)" if module.net.groups_shuffle else "")
    if checkpoint is not None:
        rules = check_resume_compatible(module.hparams.model, checkpoint, cfg.ckpt_path)
        check_resume_averaging(cfg, checkpoint, cfg.ckpt_path)
        changes = rules + resume_setting_changes(module.run_config, checkpoint["flgc_config"])
        if changes:
            log.warning("resuming with settings that differ from the checkpoint's (the continuation will not "
                        "match an uninterrupted run):\n  - %s", "\n  - ".join(changes))
        del checkpoint  # Lightning reads the file again; don't hold two copies
    module.configure_optimizers()  # built again by Lightning; here its errors (e.g. lr < 0) come before any output
    attach_run_config(trainer.loggers, module.run_config)  # MLflow / W&B log the whole config as parameters
    channels_last = cfg.get("channels_last", "auto")
    module.channels_last = trainer.strategy.root_device.type == "cuda" if channels_last == "auto" else bool(channels_last)
    log.info("run directory: %s", cfg.run_dir)
    try:  # weights_only said, not left to defaults (Lightning's is False for URLs); the file was checked above
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
    except SIGTERMException:
        raise _stopped(trainer) from None
    except Exception as err:  # a user error (e.g. a checkpoint that could not be written) whose cleanup failed
        cause = _user_error_behind(err)  # too (full disk: the loggers' final writes) is still reported as itself
        if cause is not None and cause is not err:
            raise cause from None
        raise
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None and checkpoint.best_model_path:
        log.info("best checkpoint: %s (val/acc %.4f)", checkpoint.best_model_path, float(checkpoint.best_model_score))
        log.info("last checkpoint: %s", checkpoint.last_model_path)
        if cfg.get("test_after_fit"):
            load_checkpoint(checkpoint.best_model_path)  # a resumed run's best path came from a file: one of ours?
            trainer.test(module, datamodule=datamodule, ckpt_path=checkpoint.best_model_path, weights_only=True)
            metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    elif cfg.get("test_after_fit") and trainer.fast_dev_run:  # debug=fast writes no checkpoint: test the weights as they are
        trainer.test(module, datamodule=datamodule)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    return metrics


def _test_best(cfg: DictConfig) -> dict[str, float]:
    """``test_after_fit`` for a finished run whose test did not happen (it was stopped in between)."""
    checkpoint = load_checkpoint(_last_checkpoint(cfg))
    best = checkpoint.get("callbacks", {})
    best_path = next((v.get("best_model_path") for k, v in best.items() if k.startswith("ModelCheckpoint")
                      and isinstance(v, dict) and v.get("best_model_path")), None)
    best_path = best_path or str(_last_checkpoint(cfg))
    load_checkpoint(best_path)  # a path named by a file: read it through the same checks before Lightning does
    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    module = build_module(cfg, datamodule)
    trainer = build_trainer(cfg)
    trainer.test(module, datamodule=datamodule, ckpt_path=best_path, weights_only=True)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def _user_error_behind(err: BaseException) -> Optional[UserError]:
    """The first :class:`UserError` in an exception's chain (raised during the handling of another)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, UserError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _stopped(trainer: pl.Trainer) -> Stopped:
    """The message for a run stopped by a signal: where its resumable checkpoint is and how to continue."""
    preemption = next((c for c in trainer.callbacks if isinstance(c, Preemption)), None)
    signum = preemption.received if preemption is not None and preemption.received else signal.SIGTERM
    saved = next((c.stopped_checkpoint for c in trainer.callbacks if isinstance(c, StepCheckpoint)
                  and c.stopped_checkpoint), None)
    where = (f"resumable checkpoint written at global step {trainer.global_step}: {saved}" if saved else
             "no checkpoint was written at the stop (it came before the first training step or during validation); "
             "the last one in the run's checkpoints folder stays")
    requeued = " SLURM requeue requested." if preemption is not None and preemption.requeue else ""
    return Stopped(f"{signal.Signals(signum).name} received; training stopped, {where}.{requeued} Run the same "
                   "command again to continue it (same hydra.run.dir / hydra.sweep.dir), or add "
                   f"ckpt_path={saved or 'PATH/TO/last.ckpt'}.", signum)
