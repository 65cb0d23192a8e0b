"""Shared wrapper for the entry points: user errors become one message and a non-zero exit."""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Callable, TypeVar

from flgc_lightning.data.cifar_files import DataNotFoundError
from flgc_lightning.errors import Stopped, UserError

T = TypeVar("T")
_STARTED = time.time()  # imported before Hydra creates the run directory
ERROR_FILE = "error.txt"  # written by a sweep job that stopped on a user error


class SweepJobFailed(Exception):
    """One multirun job hit a user error. Hydra records it, runs the remaining jobs, then exits non-zero."""


def _hydra_config():
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def _created_by_us(path: Path) -> bool:
    return all(p.stat().st_mtime >= _STARTED - 1 for p in [path, *path.rglob("*")])


def remove_own_outputs() -> None:
    """After a user error, remove what Hydra wrote for this invocation, and nothing else:
    the fresh run directory if it holds only Hydra's files (and the MLflow store ``logger=mlflow`` creates when the
    Trainer is built), or a resume's ``.hydra/resume-<time>``."""
    hydra = _hydra_config()
    if hydra is None or not hydra.output_subdir:
        return
    run_dir = Path(hydra.runtime.output_dir)
    own_subdir = run_dir / hydra.output_subdir
    if hydra.output_subdir != ".hydra":  # a resume inside an existing run: only its own record goes
        if own_subdir.is_dir() and _created_by_us(own_subdir):
            shutil.rmtree(own_subdir)
        return
    hydra_files = {".hydra", f"{hydra.job.name}.log", "mlflow.db"}
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= hydra_files and _created_by_us(run_dir):
        shutil.rmtree(run_dir)


def _record_sweep_error(run_dir: Path, err: Exception) -> None:
    """``error.txt`` in a failed sweep job's folder, so the sweep report can say why it failed."""
    try:
        if run_dir.is_dir():
            (run_dir / ERROR_FILE).write_text(f"{err}\n")
    except OSError:
        pass  # the message is on stderr already


def report_user_errors(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except Stopped as stop:  # asked to stop: the whole command (a sweep too) ends, resumable
        print(f"stopped: {stop}", file=sys.stderr)
        raise SystemExit(stop.exit_code) from None
    except (UserError, DataNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        hydra = _hydra_config()
        from hydra.types import RunMode

        if hydra is not None and hydra.mode == RunMode.MULTIRUN:  # a bad point must not cancel the sweep;
            _record_sweep_error(Path(hydra.runtime.output_dir), err)  # its folder stays for the sweep report
            raise SweepJobFailed(str(err)) from None
        remove_own_outputs()
        raise SystemExit(1) from None
