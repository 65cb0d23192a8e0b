"""Checks that run before any heavy work, so a bad command line fails in seconds with one message."""
from __future__ import annotations

import inspect
import logging
from typing import Any

from omegaconf import DictConfig, OmegaConf

from flgc_lightning.errors import CheckpointError, ConfigError
from flgc_lightning.models import groupable_convs
from flgc_lightning.training.assign_schedule import AssignSchedule
from flgc_lightning.training.schema import TrainKeys, _Schema, _signature, schema_problems

log = logging.getLogger(__name__)

MOBILENET_TARGET = "flgc_lightning.models.MobileNetV2"
# Model keys that change how the network learns, not what it is (same parameters, same forward values):
# a resume may change them, with a warning that it is no longer an exact continuation.
LEARNING_RULE_KEYS = ("assign_grad", "dense_weight_grad")


def validate_config(cfg: DictConfig, keys: type[_Schema] = TrainKeys) -> None:
    """Raise :class:`ConfigError` listing every problem found (every key checked against its schema,
    :mod:`flgc_lightning.training.schema`); warn about FLGC groups larger than layers."""
    problems = schema_problems(cfg, keys)
    if not problems and cfg.get("assign_optim") is not None:
        try:
            AssignSchedule.from_options(OmegaConf.to_container(cfg.assign_optim, resolve=True))
        except ValueError as err:
            problems.append(f"assign_optim.{err}")
        else:
            if cfg.assign_optim.get("regroup_epochs") and not OmegaConf.select(cfg, "model.dense_weight_grad"):
                log.warning("assign_optim.regroup_epochs without model.dense_weight_grad=true: weights outside the "
                            "groups never train, so co-clustering |W| mostly returns the current groups")
    model = cfg.get("model")
    if not problems and model is not None and model.get("_target_") == MOBILENET_TARGET:
        groups = int(model.groups)
        convs = groupable_convs(model.get("width_mult", 1.0), model.get("group_expand", False),
                                model.get("group_shortcut", False))
        balanced = model.get("use_flgc", False) and model.get("assignment") == "balanced"
        if groups > 1 and (not model.get("use_flgc", False) or balanced):
            bad = [f"{name} ({cin}->{cout})" for name, cin, cout in convs if cin % groups or cout % groups]
            if bad:
                what = "balanced FLGC (model.assignment=balanced)" if balanced else "standard grouped conv (model.use_flgc=false)"
                problems.append(
                    f"{what} needs channel counts divisible by groups={groups}; these layers are not: "
                    f"{', '.join(bad)}. Use model.use_flgc=true with learned groups (any group count) or another groups value"
                )
        elif groups > 1:
            small = [f"{name} ({cin}->{cout})" for name, cin, cout in convs if groups > min(cin, cout)]
            if small:
                log.warning("groups=%d exceeds the channel count of %s: some learned groups will be empty "
                            "(allowed: empty groups are handled in training and deployment)", groups, ", ".join(small))
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))


def _with_defaults(model_cfg: dict) -> dict:
    """A model config with every argument it leaves out at its constructor default (a checkpoint written
    before an argument existed compares as that default)."""
    try:
        params = _signature(model_cfg["_target_"])[0]
    except Exception:  # no or unknown target: compare what is there
        return dict(model_cfg)
    return {**{k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}, **model_cfg}


def check_resume_compatible(model_cfg: dict, checkpoint: dict, path: str) -> list[str]:
    """The network a resume builds must be the one the checkpoint holds: list every conflicting key.

    Returns the learning-rule keys (:data:`LEARNING_RULE_KEYS`) that differ, for the caller to warn about.
    """
    saved = _with_defaults(checkpoint["hyper_parameters"].get("model", {}))
    model_cfg = _with_defaults(model_cfg)
    keys = sorted(set(saved) | set(model_cfg))
    differ = [f"model.{k}: checkpoint has {saved.get(k)!r}, this run has {model_cfg.get(k)!r}"
              for k in keys if saved.get(k) != model_cfg.get(k)]
    rules = [d for d in differ if d.split(":")[0][len("model."):] in LEARNING_RULE_KEYS]
    conflicts = [d for d in differ if d not in rules]
    if conflicts:
        raise CheckpointError(
            f"cannot resume from '{path}': the model structure differs from the checkpoint's:\n  - "
            + "\n  - ".join(conflicts)
            + "\nDrop these overrides to resume the saved run, or start a new run without ckpt_path."
        )
    return rules


def averages_weights(cfg: DictConfig) -> bool:
    """Whether the run's callbacks include a weight-averaging one (``callbacks=ema``)."""
    from hydra.utils import get_class
    from pytorch_lightning.callbacks import WeightAveraging

    for entry in (cfg.get("callbacks") or {}).values():
        if isinstance(entry, DictConfig) and "_target_" in entry:
            try:
                if issubclass(get_class(entry._target_), WeightAveraging):
                    return True
            except (ImportError, TypeError, ValueError):
                continue
    return False


def check_resume_averaging(cfg: DictConfig, checkpoint: dict, path: str) -> None:
    """A checkpoint written with weight averaging holds the *averaged* weights in ``state_dict``; resuming it without
    the callback would silently continue training from the average instead of the raw weights."""
    from flgc_lightning.callbacks.ema import has_averaged_weights

    if has_averaged_weights(checkpoint) and not averages_weights(cfg):
        raise CheckpointError(
            f"cannot resume from '{path}': it was trained with weight averaging (callbacks=ema), and this run has no "
            "weight-averaging callback, so it would continue from the averaged weights instead of the trained ones. "
            "Add callbacks=ema (with the run's callbacks.ema.* settings) to resume it.")


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flatten(item, f"{prefix}.{key}").items()}
    return {prefix: value}


# Keys added after checkpoints were first written: a checkpoint without them ran with these values.
SETTING_DEFAULTS = {f"assign_optim.{k}": v for k, v in TrainKeys.model_fields["assign_optim"].default.model_dump().items()}


def resume_setting_changes(current: dict, saved: dict,
                           sections=("seed", "data", "optimizer", "scheduler", "assign_optim")) -> list[str]:
    """Settings a resume changes that break an exact continuation (data order, optimizer, schedule)."""
    def settings(config: dict) -> dict[str, Any]:
        found = {k: v for s in sections for k, v in _flatten(config.get(s), s).items()}
        found.pop("assign_optim", None)  # a config from before the section existed: its keys are the defaults
        return {**SETTING_DEFAULTS, **found}

    now, before = settings(current), settings(saved)
    return [f"{k}: checkpoint {before.get(k)!r}, now {now.get(k)!r}"
            for k in sorted(set(now) | set(before)) if now.get(k) != before.get(k)]
