"""Configs read from a file build only code on an allow-list: a checkpoint cannot choose what runs.

A checkpoint stores the configs its network, optimizer, scheduler and data were built from, as
``{"_target_": "dotted.path", **arguments}``, and ``test.py``, the deploy step, resume,
``ImageClassifier.load_from_checkpoint`` and the assignment tools read them back. Handed to Hydra as they
are, such a dict imports and calls whatever it names (``{"_target_": "os.makedirs", "name": ...}``), so a
downloaded checkpoint could run code although ``torch.load(weights_only=True)`` reads only plain data.

So every config that comes from a file passes :func:`file_config_problems` before anything is imported or
built: its ``_target_`` must be on :data:`ALLOWED_TARGETS` for its group; none of its values may hold another
``_target_``, a Hydra key (``_args_``, ``_partial_``, ``_recursive_``, ``_convert_``: any ``_name_``) or an
OmegaConf interpolation (``${...}``: resolvers run when Hydra reads the value; ``oc.env`` reads the
environment, ``oc.decode`` makes new nodes, ``_target_`` ones included); then its arguments are checked
against the class's signature
(:func:`flgc_lightning.training.schema.check_node`). Configs the user composes (``conf/*.yaml`` and the
command line, or code calling :class:`~flgc_lightning.training.module.ImageClassifier` with
``config_origin=TRUSTED``) are trusted as any code the user runs is. A checkpoint's ``trainer``,
``callbacks`` and ``logger`` configs are never built from the file, so they are not checked.
"""
from __future__ import annotations

from typing import Any, Optional

from flgc_lightning.errors import CheckpointError

# What a file may build, per config group: the dotted paths our conf/ writes (and our classes' own module
# paths). One registry: to load checkpoints of another network of this package, add its class path to "model".
ALLOWED_TARGETS: dict[str, set[str]] = {
    "model": {"flgc_lightning.models.MobileNetV2", "flgc_lightning.models.mobilenetv2.MobileNetV2"},
    "optimizer": {"torch.optim.SGD", "torch.optim.Adam", "torch.optim.AdamW"},
    "scheduler": {"torch.optim.lr_scheduler.MultiStepLR", "torch.optim.lr_scheduler.CosineAnnealingLR",
                  "torch.optim.lr_scheduler.StepLR", "torch.optim.lr_scheduler.ExponentialLR"},
    "data": {"flgc_lightning.data.CifarDataModule", "flgc_lightning.data.cifar.CifarDataModule",
             "flgc_lightning.data.DigitsDataModule", "flgc_lightning.data.digits.DigitsDataModule",
             "flgc_lightning.data.ImageFolderDataModule", "flgc_lightning.data.imagefolder.ImageFolderDataModule"},
}

# ImageClassifier's hyperparameters, as save_hyperparameters writes them into a checkpoint.
HPARAM_KEYS = ("model", "optimizer", "scheduler", "input_size", "assign_optim")
# Sections of a checkpoint whose configs something builds: hyper_parameters (ImageClassifier) and the run
# config (test.py builds its data module from ``flgc_config.data``).
CHECKED = {"hyper_parameters": ("model", "optimizer", "scheduler"),
           "flgc_config": ("model", "optimizer", "scheduler", "data")}
OPTIONAL = {"scheduler"}  # null where the run had no LR schedule


class _Trusted:
    """The marker of a config the user composed; no file can hold it (``weights_only`` loads plain data only)."""

    def __repr__(self) -> str:
        return "TRUSTED"


TRUSTED = _Trusted()


def _hydra_key(key: Any) -> bool:
    return isinstance(key, str) and len(key) > 2 and key.startswith("_") and key.endswith("_")


def _hidden_code(value: Any, where: str) -> list[str]:
    """Places below a config node's top level where Hydra or OmegaConf would turn data into code."""
    found = []
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "_target_":
                found.append(f"{where}: a nested _target_ ({item!r}); arguments from a file must be plain values")
            elif _hydra_key(key):
                found.append(f"{where}.{key}: Hydra key; not allowed in a config from a file")
            else:
                found += _hidden_code(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found += _hidden_code(item, f"{where}[{i}]")
    elif isinstance(value, str) and ("${" in value or value == "???"):
        found.append(f"{where}: {value!r} is an interpolation or a missing value; a file's config holds plain values")
    return found


def file_config_problems(node: Any, group: str, key: Optional[str] = None) -> list[str]:
    """Why the config ``node`` of ``group`` (``model``, ``optimizer``, ``scheduler``, ``data``), read from a file,
    must not be built; empty if it may. ``key``: its name in messages (default ``group``).

    The ``_target_`` is compared with :data:`ALLOWED_TARGETS` before anything is imported; only an allowed
    node without hidden code has its arguments checked against the class (which imports it)."""
    key = key or group
    if not isinstance(node, dict) or not isinstance(node.get("_target_"), str):
        return [f"{key}: expected a config with a _target_ naming a class, got {type(node).__name__}"]
    target = node["_target_"]
    allowed = ALLOWED_TARGETS.get(group, set())
    if target not in allowed:
        return [f"{key}._target_: {target!r} is not one of the classes a file may build "
                f"({', '.join(sorted(allowed)) or 'none'})"]
    problems = [f"{key}.{name}: Hydra key; not allowed in a config from a file"
                for name in node if name != "_target_" and _hydra_key(name)]
    for name, value in node.items():
        if not _hydra_key(name):
            problems += _hidden_code(value, f"{key}.{name}")
    if problems:
        return problems
    from flgc_lightning.training.schema import FILLED, PROVIDED, check_node  # imports Lightning: only when needed

    return check_node(node, key, PROVIDED.get(group, ()), FILLED.get(group, ()))


def refusal(source: str, problems: list[str]) -> CheckpointError:
    """The error for a file whose configs failed :func:`file_config_problems`, naming the file and each problem."""
    return CheckpointError(
        f"{source} refused (a file cannot choose the code that runs):\n  - " + "\n  - ".join(problems)
        + "\nIf the file is yours and names another class of this package, add that class to "
          "flgc_lightning.training.file_config.ALLOWED_TARGETS."
    )


def hparams_problems(hparams: Any, complete: bool = True) -> list[str]:
    """:func:`file_config_problems` of ImageClassifier's arguments read from a file. ``complete``: they are about to
    be ImageClassifier's arguments, so each must be one and the required ones must be there; otherwise (a checkpoint
    read for its weights, maybe of another LightningModule) only the configs present are checked."""
    if not isinstance(hparams, dict):
        return [f"hyper_parameters: expected a mapping, got {type(hparams).__name__}"]
    problems = [f"hyper_parameters.{k}: not an argument of ImageClassifier" for k in hparams
                if complete and k not in HPARAM_KEYS]
    for group in CHECKED["hyper_parameters"]:
        node = hparams.get(group)
        if (node is None or node == {}) and (group in OPTIONAL or not complete):
            continue
        problems += file_config_problems(node, group, f"hyper_parameters.{group}")
    if not complete:
        return problems
    input_size = hparams.get("input_size", [3, 32, 32])
    if not (isinstance(input_size, (list, tuple)) and len(input_size) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in input_size)):
        problems.append(f"hyper_parameters.input_size: expected 3 positive integers (C, H, W), got {input_size!r}")
    assign = hparams.get("assign_optim")
    if assign is not None:  # plain numbers only, the keys of the schema (older checkpoints: a subset)
        from pydantic import ValidationError

        from flgc_lightning.training.schema import AssignOptim
        try:
            AssignOptim.model_validate({"lr_mult": 1.0, **assign} if isinstance(assign, dict) else assign)
        except ValidationError as err:
            problems.append(f"hyper_parameters.assign_optim: expected {', '.join(AssignOptim.model_fields)} "
                            f"(numbers), got {assign!r} ({err.errors()[0]['msg']})")
    return problems


def check_hparams(hparams: Any, source: str) -> None:
    """:class:`CheckpointError` naming ``source`` unless ``hparams`` build only allowed code."""
    problems = hparams_problems(hparams)
    if problems:
        raise refusal(source, problems)


def check_checkpoint(checkpoint: dict, source: str) -> None:
    """Every config in a checkpoint that something may build: ``hyper_parameters``' and the run config's
    (``flgc_config``) ``model``/``optimizer``/``scheduler``/``data``, those present. Raises :class:`CheckpointError`
    naming ``source``. (Whoever then builds ImageClassifier from the hyperparameters checks them whole.)"""
    problems = hparams_problems(checkpoint.get("hyper_parameters", {}), complete=False)
    run_config = checkpoint.get("flgc_config", {})  # absent from checkpoints of a Trainer outside train.py
    if not isinstance(run_config, dict):
        problems.append(f"flgc_config: expected a mapping, got {type(run_config).__name__}")
        run_config = {}
    for group in CHECKED["flgc_config"]:
        node = run_config.get(group)
        if node is None or node == {}:  # a run config without that group (or scheduler=none)
            continue
        problems += file_config_problems(node, group, f"flgc_config.{group}")
    if problems:
        raise refusal(source, problems)


def instantiate_from_file(node: Any, group: str, source: str, **kwargs: Any) -> Any:
    """Build a config read from a file: checked by :func:`file_config_problems`, then instantiated."""
    problems = file_config_problems(node, group)
    if problems:
        raise refusal(source, problems)
    from flgc_lightning.training.schema import instantiate_checked

    return instantiate_checked(node, group, **kwargs)
