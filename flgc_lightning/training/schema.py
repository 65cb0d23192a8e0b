"""Every config key checked, by schema: the signatures of the classes the config instantiates.

A config node with ``_target_`` is the keyword arguments of that class, so the class's own
signature is its schema: every key must be one of its parameters and every value must match the
parameter's type annotation (checked with pydantic in strict mode: ``"maybe"`` is not a bool, ``0.5``
is not an int). A parameter added to a class is checked the day it is added, with no list to keep in
sync (Hydra's dataclass schemas would repeat each signature by hand). Keys without a class (the top
level of ``train.yaml`` / ``test.yaml``) have their own schemas below. Range checks belong to the
constructors that own the values; :func:`instantiate_checked` turns their ``ValueError`` into a
config error that names the key.
"""
from __future__ import annotations

import collections.abc
import difflib
import inspect
import sys
import typing
from functools import lru_cache
from typing import Any, Callable, Literal, Optional, Union

from hydra.errors import InstantiationException
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, OmegaConf
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from flgc_lightning.errors import ConfigError

STRICT = ConfigDict(strict=True, arbitrary_types_allowed=True)
HYDRA_KEYS = ("_target_", "_partial_", "_recursive_", "_convert_", "_args_")


class _Schema(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class AssignOptim(_Schema):
    """Types only; ranges are checked by ``ImageClassifier`` and ``AssignSchedule``, which own the values."""

    lr_mult: float
    weight_decay: Optional[float] = None
    warmup_epochs: int = 0
    freeze_epoch: Optional[int] = None
    tau_start: float = 1.0
    tau_end: float = 0.1
    tau_epochs: Optional[int] = None
    regroup_epochs: list[int] = []


class TrainKeys(_Schema):
    """The keys of ``train.yaml`` that belong to no class (config groups are checked by their ``_target_``)."""

    groups: int = Field(ge=1)
    seed: int
    num_threads: Optional[int] = Field(default=None, ge=1)
    ckpt_path: Optional[str] = None
    run_dir: str
    test_after_fit: bool = False
    assign_optim: AssignOptim = AssignOptim(lr_mult=1.0)
    channels_last: Union[bool, Literal["auto"]] = "auto"
    compile: Union[bool, Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]] = False
    cuda_graphs: bool = False
    arm: Optional[str] = None  # experiment=subset_study, subset_study_v2
    retrain_from_arm: Optional[str] = None  # experiment=subset_study_v2
    optimized_metric: Optional[str] = None  # hparams_search=optuna: what train.py returns to the sweeper


class TestKeys(_Schema):
    ckpt_path: Optional[str] = None
    seed: int
    run_dir: str


GROUPS = ("model", "data", "optimizer", "scheduler", "trainer", "callbacks", "logger")


def _is_target(value: Any) -> bool:
    return isinstance(value, dict) and "_target_" in value


@lru_cache(maxsize=None)
def _signature(target: str) -> tuple[dict[str, inspect.Parameter], dict[str, Any], bool]:
    """Parameters, resolved annotations and whether ``**kwargs`` is accepted, of a ``_target_``."""
    obj = get_method(target)  # a class or a function
    init = obj.__init__ if inspect.isclass(obj) else obj
    params = dict(inspect.signature(obj).parameters)
    hints = _type_hints(init)
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    params = {k: p for k, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return params, hints, var_kw


def _type_hints(function: Callable) -> dict[str, Any]:
    """Resolved annotations; one at a time where the module's own names don't resolve them all
    (torch's schedulers annotate with ``Iterable`` without importing it). Unresolvable ones are skipped."""
    try:
        return typing.get_type_hints(function)
    except Exception:
        pass
    namespace = {**vars(collections.abc), **vars(typing), **getattr(sys.modules.get(function.__module__), "__dict__", {})}
    hints = {}
    for name, annotation in getattr(function, "__annotations__", {}).items():
        try:
            hints[name] = eval(annotation, namespace) if isinstance(annotation, str) else annotation  # noqa: S307
        except Exception:
            continue
    return hints


@lru_cache(maxsize=None)
def _adapter(annotation: Any) -> Optional[TypeAdapter]:
    try:
        return TypeAdapter(annotation, config=STRICT)
    except Exception:  # a type pydantic cannot check: trust the constructor
        return None


def describe(annotation: Any) -> str:
    """A readable name of a type annotation: ``an integer``, ``a number or null``, ``one of 'a', 'b'``."""
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", type(None): "null",
             list: "a list", dict: "a mapping"}
    if annotation in names:
        return names[annotation]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        parts = [describe(a) for a in args]
        return " or ".join(dict.fromkeys(parts))
    if origin in (list, tuple, typing.Sequence, typing.Iterable) or str(origin).endswith(("Sequence'>", "Iterable'>")):
        plural = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}
        return f"a list of {plural.get(args[0], describe(args[0]))}" if args else "a list"
    return getattr(annotation, "__name__", str(annotation))


def _suggest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_node(node: dict, key: str, provided: tuple[str, ...] = (), filled: tuple[str, ...] = (),
               interpolated: frozenset[str] = frozenset()) -> list[str]:
    """Problems of one ``_target_`` node: unknown keys, wrong types, missing required arguments.

    ``provided``: arguments the program passes itself (e.g. an optimizer's ``params``);
    ``filled``: arguments the program fills in when the config leaves them null;
    ``interpolated``: full keys whose value comes from another key (checked, and reported, there).
    """
    target = node["_target_"]
    try:
        params, hints, var_kw = _signature(target)
    except Exception as err:
        return [f"{key}._target_: cannot import {target!r} ({type(err).__name__}: {err})"]
    problems = []
    for name, value in node.items():
        if name in HYDRA_KEYS:
            continue
        where = f"{key}.{name}"
        if name not in params:
            if not var_kw:
                problems.append(f"{where}: not an argument of {target}{_suggest(name, params)}")
            continue
        if _is_target(value):
            problems += check_node(value, where)
            continue
        if isinstance(value, list) and value and all(_is_target(v) for v in value):
            for i, item in enumerate(value):
                problems += check_node(item, f"{where}[{i}]")
            continue
        if (value is None and name in filled) or where in interpolated:
            continue
        adapter = _adapter(hints.get(name)) if name in hints else None
        if adapter is None:
            continue
        try:
            checked = adapter.validate_python(value)
            if isinstance(checked, collections.abc.Iterator) and not isinstance(value, collections.abc.Iterator):
                list(checked)  # pydantic checks Iterable[...] lazily
        except ValidationError:
            problems.append(f"{where} must be {describe(hints[name])}, got {value!r}")
    for name, p in params.items():
        if p.default is inspect.Parameter.empty and name not in node and name not in provided and name != "self":
            problems.append(f"{key}.{name}: required by {target} but missing")
    return problems


def _check_keys(schema: type[_Schema], values: dict) -> list[str]:
    problems = []
    try:
        schema.model_validate(values)
    except ValidationError as err:
        unions = set()
        for e in err.errors():
            where = ".".join(str(p) for p in e["loc"])
            field = schema.model_fields.get(str(e["loc"][0]))
            if e["type"] == "extra_forbidden":
                problems.append(f"{where}: not a config key{_suggest(str(e['loc'][-1]), schema.model_fields)}")
            elif len(e["loc"]) == 2 and field is not None and typing.get_origin(field.annotation) is Union:
                if e["loc"][0] not in unions:  # one line for a union, not one per member pydantic tried
                    unions.add(e["loc"][0])
                    problems.append(f"{e['loc'][0]} must be {describe(field.annotation)}, got {e['input']!r}")
            else:
                problems.append(f"{where}: {e['msg'][0].lower()}{e['msg'][1:]}, got {e['input']!r}")
    return problems


# Arguments the program passes to each group's class itself, or fills in when the config leaves them null.
PROVIDED = {"optimizer": ("params",), "scheduler": ("optimizer",)}
FILLED = {"model": ("num_classes", "in_channels")}


def _interpolated(cfg: Any, prefix: str = "") -> set[str]:
    """Full keys of ``cfg`` whose value is an interpolation (``model.groups: ${groups}``)."""
    found = set()
    if isinstance(cfg, DictConfig):
        for name in cfg.keys():
            where = f"{prefix}{name}"
            if OmegaConf.is_interpolation(cfg, name):
                found.add(where)
            else:
                found |= _interpolated(cfg._get_node(name), f"{where}.")
    return found


def schema_problems(cfg: DictConfig, keys: type[_Schema] = TrainKeys) -> list[str]:
    """Every problem of a composed config, top-level keys and every config group."""
    interpolated = frozenset(_interpolated(cfg))
    values = OmegaConf.to_container(cfg, resolve=True)
    top = {k: v for k, v in values.items() if k not in GROUPS}
    problems = _check_keys(keys, top)
    for group in GROUPS:
        node = values.get(group)
        if not node:
            continue
        if _is_target(node):
            problems += check_node(node, group, PROVIDED.get(group, ()), FILLED.get(group, ()), interpolated)
        elif isinstance(node, dict):  # callbacks / logger: a mapping of nodes (null entries are dropped)
            for name, entry in node.items():
                if _is_target(entry):
                    problems += check_node(entry, f"{group}.{name}", interpolated=interpolated)
                elif entry is not None:
                    problems.append(f"{group}.{name}: expected a config with _target_ or null, got {entry!r}")
    return problems


def _named(key: str, message: str, target: Optional[str]) -> str:
    """``width_mult must be > 0`` from MobileNetV2 -> ``model.width_mult must be > 0``."""
    first = message.split(" ", 1)[0]
    if target:
        try:
            if first in _signature(target)[0]:
                return f"{key}.{message}"
        except Exception:
            pass
    return f"{key}: {message}"


CONSTRUCTOR_ERRORS = (ValueError, TypeError, ConfigError, MisconfigurationException)


def instantiate_checked(node: Any, key: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` whose constructor errors (range checks) become a :class:`ConfigError` naming the key."""
    target = node.get("_target_") if hasattr(node, "get") else None
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, CONSTRUCTOR_ERRORS):
            raise ConfigError("invalid configuration:\n  - " + _named(key, str(cause).strip(), target)) from None
        raise


def construct_checked(build: Callable[[], Any], key: str, target: Optional[str] = None) -> Any:
    """Run a constructor the program calls itself; its value errors become a :class:`ConfigError` naming ``key``."""
    try:
        return build()
    except CONSTRUCTOR_ERRORS as err:
        raise ConfigError("invalid configuration:\n  - " + _named(key, str(err).strip(), target)) from None
