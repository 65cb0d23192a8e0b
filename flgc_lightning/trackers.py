"""Experiment trackers (``logger=mlflow``, ``logger=wandb``): offline by default, one tracker run per run directory.

Both are Lightning's own loggers with three additions:

- **Offline by default.** MLflow writes to a local tracking store in the run directory (SQLite,
  ``<run dir>/mlflow.db``: MLflow 3 refuses its old file store by default) unless ``tracking_uri`` names another
  store or a server; W&B runs in offline mode (``<run dir>/wandb/offline-run-*``, ``wandb sync`` uploads them).
- **Resume continues the same tracker run.** The tracker's run id is kept in ``<run dir>/trackers.json`` (written by
  rank 0 only, the first time the tracker logs). A resumed run (``ckpt_path=...``, or the same command again) uses the
  same run directory, finds the id there and logs into that run: ``MLFlowLogger(run_id=...)``,
  ``WandbLogger(id=..., resume="allow")``.
- **The whole composed config as parameters**, not only the LightningModule's hyperparameters: MLflow params are the
  config flattened to dotted keys (``optimizer.lr``, ``model.groups``), W&B's config is the nested config. Values the
  program fills in (``model.num_classes``: null in the config, 10 for CIFAR-10) are the filled-in ones.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pytorch_lightning.loggers import MLFlowLogger, WandbLogger
from pytorch_lightning.utilities import rank_zero_only

from flgc_lightning.errors import ConfigError

log = logging.getLogger(__name__)

RUN_IDS_FILE = "trackers.json"
MAX_PARAM_LENGTH = 500  # MLflow stores longer values too (up to 6,000 characters), but older servers cut at 500


def read_run_ids(run_dir: str | Path) -> dict[str, dict]:
    """The tracker runs recorded in ``<run dir>/trackers.json`` (empty when there is none or it is unreadable)."""
    try:
        data = json.loads((Path(run_dir) / RUN_IDS_FILE).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def remember_run_id(run_dir: str | Path, tracker: str, entry: dict) -> None:
    """Record ``tracker``'s run in ``trackers.json``; rank 0 only, atomic (a crash leaves the previous file)."""
    if rank_zero_only.rank != 0:
        return
    from flgc_lightning.callbacks.run_summary import write_json_atomic

    ids = read_run_ids(run_dir)
    if ids.get(tracker) == entry:
        return
    try:
        write_json_atomic(Path(run_dir) / RUN_IDS_FILE, {**ids, tracker: entry})
    except OSError as err:  # the run goes on; a resume would then start a new tracker run
        log.warning("could not record the %s run id in %s: %s", tracker, run_dir, err.strerror or err)


def merged_config(run_config: Optional[dict], hparams: dict) -> dict:
    """The composed run config with Lightning's hyperparameters on top (they hold the filled-in values)."""
    def merge(base: Any, top: Any) -> Any:
        if isinstance(base, dict) and isinstance(top, dict):
            return {**base, **{k: merge(base.get(k), v) for k, v in top.items()}}
        return top

    return merge(dict(run_config or {}), dict(hparams or {}))


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """``{"optimizer": {"lr": 0.1}}`` -> ``{"optimizer.lr": 0.1}``; lists stay values."""
    if isinstance(config, dict):
        if not config and prefix:
            return {prefix: {}}
        return {k: v for key, item in config.items() for k, v in flatten(item, f"{prefix}{key}.").items()}
    return {prefix[:-1]: config}


class _ConfigLogging:
    """What the trackers share: the run config to log (set by :func:`flgc_lightning.training.run.train`)."""

    run_config: Optional[dict] = None

    def _params(self, params: Any) -> dict:
        hparams = dict(params) if isinstance(params, dict) else dict(vars(params))
        return merged_config(self.run_config, hparams)


class MLflowTracker(_ConfigLogging, MLFlowLogger):
    """Lightning's ``MLFlowLogger``, offline by default, continuing the run directory's MLflow run on resume.

    Args:
        run_dir: the run directory: the default store (``mlflow.db``) and ``trackers.json`` live there.
        experiment_name / run_name / tags: as MLflow's (the run name defaults to MLflow's random one).
        tracking_uri: null: ``sqlite:///<run dir>/mlflow.db``; else any MLflow store or server, e.g.
            ``sqlite:////abs/path/mlflow.db`` shared by a sweep's runs or ``http://host:5000``.
        artifact_location: where a *new* experiment keeps artifacts (null: ``<run dir>/mlflow-artifacts``).
        log_model: upload checkpoints as artifacts (``true``: at the end, ``all``: every one).
    """

    def __init__(self, run_dir: str, experiment_name: str = "flgc-lightning", run_name: Optional[str] = None,
                 tracking_uri: Optional[str] = None, tags: Optional[dict[str, str]] = None,
                 artifact_location: Optional[str] = None, log_model: Union[bool, Literal["all"]] = False) -> None:
        try:
            import mlflow  # noqa: F401
        except ImportError:
            raise ConfigError("logger=mlflow needs MLflow: pip install -e '.[trackers]' (mlflow-skinny)") from None
        self.run_dir = Path(run_dir).expanduser().resolve()
        if tracking_uri is None:
            tracking_uri = f"sqlite:///{self.run_dir / 'mlflow.db'}"
        if artifact_location is None:
            artifact_location = str(self.run_dir / "mlflow-artifacts")
        stored = read_run_ids(self.run_dir).get("mlflow") or {}
        run_id = stored.get("run_id") if stored.get("tracking_uri") == tracking_uri else None
        super().__init__(experiment_name=experiment_name, run_name=run_name, tracking_uri=tracking_uri, tags=tags,
                         artifact_location=artifact_location, log_model=log_model)
        if run_id is not None and rank_zero_only.rank == 0 and not self._run_exists(run_id):
            log.warning("MLflow run %s recorded in %s is not in %s: starting a new MLflow run", run_id,
                        self.run_dir / RUN_IDS_FILE, tracking_uri)
            run_id = None
        self._run_id = run_id
        self.resumed = run_id is not None
        self._remembered = self._warned = False

    def _run_exists(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self._mlflow_client.get_run(run_id)
            return True
        except MlflowException:
            return False

    def _remember(self) -> None:
        if self._remembered:
            return
        self._remembered = True
        if self.resumed:  # it was left FINISHED (or RUNNING, if killed): it is running again
            self.experiment.update_run(self.run_id, status="RUNNING")
            log.info("MLflow: continuing run %s", self.run_id)
        remember_run_id(self.run_dir, "mlflow", {"run_id": self.run_id, "tracking_uri": self._tracking_uri,
                                                 "experiment_id": self.experiment_id})

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        """The whole config, flattened. MLflow params cannot change: a resume logs only keys the run lacks, and says
        which values it kept (the resume's own config is in ``.hydra/resume-<time>/``)."""
        from mlflow.entities import Param

        values = {k: str(v)[:MAX_PARAM_LENGTH] for k, v in flatten(self._params(params)).items()}
        existing = self.experiment.get_run(self.run_id).data.params  # a resumed run's, or logged before the test
        changed = sorted(k for k, v in values.items() if k in existing and existing[k] != v)
        if changed and not self._warned:
            self._warned = True
            log.warning("MLflow run %s keeps its first values of %s (parameters cannot change)", self.run_id,
                        ", ".join(changed))
        new = [Param(k, v) for k, v in values.items() if k not in existing]
        for start in range(0, len(new), 100):
            self.experiment.log_batch(run_id=self.run_id, params=new[start:start + 100], **self._log_batch_kwargs)
        self._remember()

    @rank_zero_only
    def log_metrics(self, metrics, step: Optional[int] = None) -> None:
        super().log_metrics(metrics, step)
        self._remember()


class WandbTracker(_ConfigLogging, WandbLogger):
    """Lightning's ``WandbLogger``, offline by default, continuing the run directory's W&B run on resume.

    Args:
        run_dir: the run directory: W&B writes ``<run dir>/wandb/``, and ``trackers.json`` lives there.
        project / name / entity / group / tags: as W&B's.
        offline: true (default): nothing leaves the machine; ``wandb sync <run dir>/wandb/offline-run-*`` uploads
            later, each resume's folder into the same W&B run. false: log online (needs ``wandb login``).
        log_model: upload checkpoints as artifacts (online only).
    """

    def __init__(self, run_dir: str, project: str = "flgc-lightning", name: Optional[str] = None, offline: bool = True,
                 entity: Optional[str] = None, group: Optional[str] = None, tags: Optional[list[str]] = None,
                 log_model: Union[bool, Literal["all"]] = False) -> None:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError("logger=wandb needs wandb: pip install -e '.[trackers]'") from None
        if offline and log_model:
            raise ValueError("log_model needs offline=false: an offline run cannot upload checkpoints")
        self.run_dir = Path(run_dir).expanduser().resolve()
        stored = (read_run_ids(self.run_dir).get("wandb") or {}).get("id")
        self.resumed = stored is not None
        extra = {k: v for k, v in (("entity", entity), ("group", group), ("tags", tags)) if v is not None}
        super().__init__(name=name, save_dir=str(self.run_dir), id=stored, project=project,
                         offline=offline, log_model=log_model, **extra)
        self._wandb_init.pop("anonymous", None)  # wandb warns that the setting is gone, even when it is None
        self._remembered = False

    def _remember(self) -> None:
        if not self._remembered:
            self._remembered = True
            remember_run_id(self.run_dir, "wandb", {"id": self.experiment.id, "project": self._project})

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        super().log_hyperparams(self._params(params))
        self._remember()

    @rank_zero_only
    def log_metrics(self, metrics, step: Optional[int] = None) -> None:
        super().log_metrics(metrics, step)
        self._remember()


def attach_run_config(loggers: list, run_config: Optional[dict]) -> None:
    """Give the trackers among ``loggers`` the composed config they log as parameters."""
    for logger in loggers:
        if isinstance(logger, _ConfigLogging):
            logger.run_config = run_config
