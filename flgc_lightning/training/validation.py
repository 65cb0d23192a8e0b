"""Checks that run before any heavy work, so a bad command line fails in seconds with one message."""
from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig, OmegaConf

from flgc_lightning.errors import CheckpointError, ConfigError
from flgc_lightning.models import groupable_convs
from flgc_lightning.training.schema import TrainKeys, _Schema, schema_problems

log = logging.getLogger(__name__)

MOBILENET_TARGET = "flgc_lightning.models.MobileNetV2"


def validate_config(cfg: DictConfig, keys: type[_Schema] = TrainKeys) -> None:
    """Raise :class:`ConfigError` listing every problem found (every key checked against its schema,
    :mod:`flgc_lightning.training.schema`); warn about FLGC groups larger than layers."""
    problems = schema_problems(cfg, keys)
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


def check_resume_compatible(model_cfg: dict, checkpoint: dict, path: str) -> None:
    """The network a resume builds must be the one the checkpoint holds: list every conflicting key."""
    saved = checkpoint["hyper_parameters"].get("model", {})
    keys = sorted(set(saved) | set(model_cfg))
    conflicts = [f"model.{k}: checkpoint has {saved.get(k)!r}, this run has {model_cfg.get(k)!r}"
                 for k in keys if saved.get(k) != model_cfg.get(k)]
    if conflicts:
        raise CheckpointError(
            f"cannot resume from '{path}': the model structure differs from the checkpoint's:\n  - "
            + "\n  - ".join(conflicts)
            + "\nDrop these overrides to resume the saved run, or start a new run without ckpt_path."
        )


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


def resume_setting_changes(current: dict, saved: dict, sections=("seed", "data", "optimizer", "scheduler")) -> list[str]:
    """Settings a resume changes that break an exact continuation (data order, optimizer, schedule)."""
    now = {k: v for s in sections for k, v in _flatten(current.get(s), s).items()}
    before = {k: v for s in sections for k, v in _flatten(saved.get(s), s).items()}
    return [f"{k}: checkpoint {before.get(k)!r}, now {now.get(k)!r}"
            for k in sorted(set(now) | set(before)) if now.get(k) != before.get(k)]
