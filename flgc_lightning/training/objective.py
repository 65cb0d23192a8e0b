"""What ``train.py`` returns to a Hydra sweeper: a held-out validation score, never NaN.

A hyperparameter search (``optimized_metric`` set, as ``hparams_search=optuna`` does) is checked before any trial
trains: it must validate on held-out training images (``data.val_size``), not on the test split, optimise a
validation metric, and say its direction. A trial whose training fails (a diverged loss, an out-of-memory error)
returns the worst value for the direction, with the reason logged and written to the trial's ``error.txt``, so the
search goes on; problems that would hit every trial (config, data, checkpoint errors) stop the search.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Callable, Optional

from omegaconf import DictConfig, OmegaConf

from flgc_lightning.errors import ConfigError, NonFiniteLossError, Stopped, UserError

log = logging.getLogger(__name__)

BEST = "best_val_acc"  # the best epoch's validation accuracy (summary.json): the checkpoint the run selects


def sweeper_direction() -> Optional[str]:
    """``hydra.sweeper.direction`` of the running sweep, if Hydra runs one that has it."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    direction = OmegaConf.select(HydraConfig.get(), "sweeper.direction", default=None)
    return None if direction is None else str(direction).lower()


def check_search(cfg: DictConfig, direction: Optional[str]) -> None:
    """Refuse a search that would select hyperparameters on the test split or on the wrong metric."""
    metric = cfg.get("optimized_metric")
    if metric is None:
        return
    problems = []
    if metric != BEST and not str(metric).startswith("val/"):
        problems.append(f"optimized_metric must be {BEST} or a validation metric (val/acc, val/loss), got {metric!r}: "
                        "a search must not select on test or training metrics")
    if OmegaConf.select(cfg, "data.val_size") is None:
        problems.append("data.val_size is null, so validation runs on the test split and the search would choose "
                        "hyperparameters by test accuracy. Hold out training images for validation: data.val_size=N "
                        "(e.g. 5000 for CIFAR-10, 300 for the quickstart's digits)")
    if metric == BEST and not OmegaConf.select(cfg, "callbacks.run_summary"):
        problems.append(f"optimized_metric={BEST} is read from summary.json: callbacks.run_summary must be on")
    if direction not in ("maximize", "minimize"):
        problems.append("hydra.sweeper.direction must say maximize or minimize (hparams_search=optuna sets it), "
                        f"got {direction!r}")
    elif ("acc" in str(metric)) != (direction == "maximize"):
        problems.append(f"hydra.sweeper.direction={direction} does not fit optimized_metric={metric} "
                        "(accuracies are maximized, losses minimized)")
    if problems:
        raise ConfigError("invalid hyperparameter search:\n  - " + "\n  - ".join(problems))


def worst(direction: Optional[str]) -> float:
    return math.inf if direction == "minimize" else -math.inf


def score(cfg: DictConfig, metrics: dict[str, float], direction: Optional[str]) -> float:
    """The run's ``optimized_metric`` (default: best validation accuracy), or the worst value when it has none."""
    metric = cfg.get("optimized_metric") or BEST
    value = metrics.get(metric)
    if metric == BEST:
        path = OmegaConf.select(cfg, "callbacks.run_summary.path")
        try:
            value = json.loads(Path(path).read_text()).get(BEST) if path else None
        except (OSError, ValueError):
            value = None
        if value is None:
            value = metrics.get("val/acc")
    if value is None or not math.isfinite(float(value)):
        if cfg.get("optimized_metric"):
            log.warning("this run has no finite %s (%r): returning %s to the sweeper", metric, value, worst(direction))
        return worst(direction)
    return float(value)


def _record_failure(cfg: DictConfig, err: BaseException) -> None:
    try:
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.run_dir) / "error.txt").write_text(f"{type(err).__name__}: {err}\n")
    except OSError:
        pass


def run_and_score(cfg: DictConfig, train: Callable[[DictConfig], dict[str, float]]) -> float:
    """``train(cfg)`` and its score. In a search, a trial whose training fails scores the worst value."""
    direction = sweeper_direction()
    check_search(cfg, direction)
    if cfg.get("optimized_metric") is None:
        return score(cfg, train(cfg), direction)
    try:
        metrics = train(cfg)
    except Stopped:
        raise
    except NonFiniteLossError as err:
        failure = err
    except UserError:  # config, data, checkpoint: the next trial would hit it too
        raise
    except Exception as err:  # noqa: BLE001 (e.g. out of memory with this trial's settings)
        log.exception("trial failed")
        failure = err
    else:
        return score(cfg, metrics, direction)
    log.error("trial failed (%s: %s): returning %s to the sweeper", type(failure).__name__, failure, worst(direction))
    _record_failure(cfg, failure)
    return worst(direction)
