"""Shared wrapper for the entry points: user errors become one message and a non-zero exit."""
from __future__ import annotations

import sys
from typing import Callable, TypeVar

from flgc_lightning.data.cifar_files import DataNotFoundError
from flgc_lightning.errors import UserError

T = TypeVar("T")


class SweepJobFailed(Exception):
    """One multirun job hit a user error. Hydra records it, runs the remaining jobs, then exits non-zero."""


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def report_user_errors(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except (UserError, DataNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        if _in_multirun():  # an invalid point must not cancel the rest of a sweep
            raise SweepJobFailed(str(err)) from None
        raise SystemExit(1) from None
