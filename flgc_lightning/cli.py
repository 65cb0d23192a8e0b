"""Shared wrapper for the entry points: user errors become one message and exit code 1."""
from __future__ import annotations

import sys
from typing import Callable, TypeVar

from flgc_lightning.data.cifar_files import DataNotFoundError
from flgc_lightning.errors import UserError

T = TypeVar("T")


def report_user_errors(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except (UserError, DataNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
