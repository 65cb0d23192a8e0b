"""``summary.json`` in the run directory: one small file that says what a run is and how it went.

Sweep reports (:mod:`flgc_lightning.report`) read it instead of parsing logs. It is rewritten
atomically at fit start (status ``running``), after every epoch, at fit end (``finished``,
with the deployed MAC count of the learned groups) and on an exception (``failed`` or
``interrupted`` with the error), so a killed run is still visible as ``running``.
"""
from __future__ import annotations

import json
import logging
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities.exceptions import SIGTERMException

from flgc_lightning.utils.complexity import count_macs, group_size_imbalance

log = logging.getLogger(__name__)


def conv_type(groups: int, use_flgc: bool, assignment: str = "learned", assign_grad: str = "reference",
              dense_weight_grad: bool = False, groups_from: str | None = None, groups_shuffle: bool = False,
              regroup: bool = False) -> str:
    """``dense`` (1 group), ``grouped`` (standard group conv), ``FLGC`` (learned groups, the reference
    estimator), ``FLGC-frozen`` (random groups that never change), ``FLGC-balanced`` (learned, equal sizes),
    learned groups with another estimator (``FLGC-ste``, ``FLGC-gumbel+dw+rg``: ``+dw`` = dense weight gradient,
    ``+rg`` = regrouping by co-clustering ``|W|``),
    ``FLGC-retrain`` (a trained run's groups retrained from scratch) or ``FLGC-retrain-shuffled`` (its sizes)."""
    if groups == 1:
        return "dense"
    if not use_flgc:
        return "grouped"
    if groups_from:
        return "FLGC-retrain-shuffled" if groups_shuffle else "FLGC-retrain"
    if assignment == "frozen":
        return "FLGC-frozen"  # nothing learns: the estimator makes no difference
    kind = "FLGC" if assignment in (None, "learned") else f"FLGC-{assignment}"
    if assign_grad not in (None, "reference"):
        kind += f"-{assign_grad}"
    return kind + ("+dw" if dense_weight_grad else "") + ("+rg" if regroup else "")


def write_json_atomic(path: Path, data: dict) -> None:
    """Readers never see a half-written file: write a temporary file, then rename it over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _metric(trainer: pl.Trainer, name: str) -> Optional[float]:
    value = trainer.callback_metrics.get(name)
    return None if value is None else float(value)


class RunSummary(Callback):
    """Keep ``path`` (default ``<run_dir>/summary.json``) up to date during ``fit``.

    Args:
        path: where to write. A resumed run continues the file it finds there.
        monitor: the accuracy whose best and last values are reported (``val/acc``: the test
            split in the reference setting, held-out training images with ``data.val_size``).
    """

    def __init__(self, path: str, monitor: str = "val/acc") -> None:
        self.path = Path(path)
        self.monitor = monitor
        self.data: dict[str, Any] = {}
        self._fit_started = 0.0
        self._previous_wall = 0.0
        self._epoch_started: Optional[float] = None
        self._validation_started: Optional[float] = None
        self._validation_time = 0.0

    # -- helpers -----------------------------------------------------------------------------
    def _write(self, trainer: pl.Trainer) -> None:
        if not trainer.is_global_zero:
            return
        self.data["updated"] = _now()
        self.data["wall_time_s"] = round(self._previous_wall + time.monotonic() - self._fit_started, 3)
        try:
            write_json_atomic(self.path, self.data)
        except OSError as err:  # a full disk must not hide the error that matters (e.g. the checkpoint's)
            log.warning("could not write %s: %s", self.path, err.strerror or err)

    def _config(self, pl_module: pl.LightningModule) -> dict[str, Any]:
        hparams = getattr(pl_module, "hparams", {})
        model = dict(hparams.get("model") or {})
        run = getattr(pl_module, "run_config", None) or {}
        groups, use_flgc = int(model.get("groups", 1)), bool(model.get("use_flgc", False))
        data = run.get("data") or {}
        return {
            "conv_type": conv_type(groups, use_flgc, model.get("assignment", "learned"),
                                   model.get("assign_grad", "reference"), bool(model.get("dense_weight_grad")),
                                   model.get("groups_from"), bool(model.get("groups_shuffle")),
                                   bool((hparams.get("assign_optim") or {}).get("regroup_epochs"))),
            "groups": groups,
            "use_flgc": use_flgc,
            "assignment": model.get("assignment", "learned"),
            "assign_grad": model.get("assign_grad", "reference"),
            "dense_weight_grad": bool(model.get("dense_weight_grad", False)),
            "groups_from": model.get("groups_from"),
            "groups_shuffle": bool(model.get("groups_shuffle", False)),
            "assign_init_std": model.get("assign_init_std", 1.0),
            "assign_optim": hparams.get("assign_optim"),
            "width_mult": model.get("width_mult"),
            "model": model.get("_target_"),
            "data": data.get("dataset") or data.get("_target_"),
            "input_size": list(hparams.get("input_size") or []),
            "optimizer": {k: v for k, v in (hparams.get("optimizer") or {}).items() if k != "params"},
            "scheduler": (hparams.get("scheduler") or {}).get("_target_"),
            "seed": run.get("seed"),
            "val_size": data.get("val_size"),
        }

    def _set_complexity(self, pl_module: pl.LightningModule) -> None:
        for key, value in (getattr(pl_module, "complexity", None) or {}).items():
            self.data.setdefault(key, int(value))

    def _set_deployed_macs(self, pl_module: pl.LightningModule) -> None:
        """FLGC groups move while training: count the learned groups as they are now."""
        net = getattr(pl_module, "net", None)
        if net is None or "macs" not in self.data:
            return
        input_size = tuple(self.data["config"]["input_size"]) or (3, 32, 32)
        if "macs_learned" in self.data:
            self.data["macs_learned"] = count_macs(net, input_size, "learned")
            self.data["macs_deployed"] = self.data["macs_learned"]
            self.data["group_size_imbalance"] = group_size_imbalance(net)
        else:  # dense / standard grouped: the network runs as counted
            self.data["macs_deployed"] = self.data["macs"]

    # -- hooks -------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_started = time.monotonic()
        previous = self._read_existing() if trainer.ckpt_path else {}
        self._previous_wall = float(previous.get("wall_time_s") or 0.0)
        self.data = {
            "status": "running",
            "error": None,
            "started": previous.get("started") or _now(),
            "resumed_from": str(trainer.ckpt_path) if trainer.ckpt_path else None,
            "config": self._config(pl_module),
            "max_epochs": trainer.max_epochs,
            "epochs_done": previous.get("epochs_done", 0),
            "history": previous.get("history", []),
        }
        self._update_accuracy()
        self._write(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._set_complexity(pl_module)  # the module computes it in its own on_fit_start
        # A resumed run's epoch counter is restored only after on_fit_start: drop epochs it redoes.
        self.data["epochs_done"] = trainer.current_epoch
        self.data["history"] = [h for h in self.data["history"] if h["epoch"] < trainer.current_epoch]
        self._update_accuracy()
        self._write(trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_started, self._validation_time = time.monotonic(), 0.0

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validation_started = time.monotonic()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._validation_started is not None and not trainer.sanity_checking:
            self._validation_time += time.monotonic() - self._validation_started
        self._validation_started = None
        if trainer.sanity_checking or not self.data:
            return
        entry = {"epoch": trainer.current_epoch, "val_acc": _metric(trainer, self.monitor),
                 "val_loss": _metric(trainer, "val/loss")}
        self.data["history"] = [h for h in self.data["history"] if h["epoch"] != entry["epoch"]] + [entry]
        self._update_accuracy()
        self._write(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.data:
            return
        self.data["epochs_done"] = trainer.current_epoch + 1
        # Wall time of the epoch in this process (a resumed epoch: its resumed part), validation included
        # (Lightning validates before the train epoch ends); the metrics read above synchronised the device.
        times = {}
        if self._epoch_started is not None:
            times = {"epoch_time_s": round(time.monotonic() - self._epoch_started, 3),
                     "val_time_s": round(self._validation_time, 3)}
        for entry in self.data["history"]:
            if entry["epoch"] == trainer.current_epoch:
                entry.update(train_acc=_metric(trainer, "train/acc"), train_loss=_metric(trainer, "train/loss"),
                             **times)
        self._write(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.data:
            return
        self._set_complexity(pl_module)
        if trainer.is_global_zero:
            self._set_deployed_macs(pl_module)
        moved = _metric(trainer, "assign/ever_moved")
        if moved is not None:
            self.data["channels_ever_moved"] = int(moved)
        from flgc_lightning.callbacks.assignment_tracker import AssignmentTracker

        tracker = next((c for c in trainer.callbacks if isinstance(c, AssignmentTracker)), None)
        if tracker is not None and tracker.diagnostics():
            self.data["assignment_diagnostics"] = tracker.diagnostics()
        self.data["status"] = "finished"
        self._write(trainer)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``test_after_fit``: the test accuracy of the checkpoint the run selected (best on validation).
        Also when a finished run is tested later by a new process (the file is read back then)."""
        data = self.data or self._read_existing()
        if data.get("status") != "finished" or not trainer.is_global_zero:
            return
        data.update(test_acc=_metric(trainer, "test/acc"), test_loss=_metric(trainer, "test/loss"),
                    test_checkpoint=str(trainer.ckpt_path) if trainer.ckpt_path else None, updated=_now())
        self.data = data
        try:
            write_json_atomic(self.path, data)  # not _write: training wall time does not include the test
        except OSError as err:
            log.warning("could not write %s: %s", self.path, err.strerror or err)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not self.data:
            return
        stopped = isinstance(exception, (KeyboardInterrupt, SIGTERMException))  # Ctrl-C, preemption: resumable
        self.data["status"] = "interrupted" if stopped else "failed"
        self.data["error"] = f"{type(exception).__name__}: {exception}"[:2000]
        self._set_complexity(pl_module)
        self._write(trainer)

    def _update_accuracy(self) -> None:
        scored = [h for h in self.data["history"] if h.get("val_acc") is not None]
        best = max(scored, key=lambda h: h["val_acc"], default=None)
        self.data["best_val_acc"] = best["val_acc"] if best else None
        self.data["best_epoch"] = best["epoch"] if best else None
        self.data["last_val_acc"] = scored[-1]["val_acc"] if scored else None

    def _read_existing(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
