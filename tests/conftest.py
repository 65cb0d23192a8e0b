"""Shared fixtures: repo paths, the shared real CIFAR-10 subset, and a subprocess runner."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests import conftest / probes by name

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on two cores: one thread each, for the tests and the command lines they start (two threads per
    # worker oversubscribe the cores: 1.1x faster than one process instead of 1.7x). Tests of threading set theirs.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent
SUBSET = REPO.parent / "shared" / "data" / "cifar10-subset"


@pytest.fixture(scope="session")
def cifar_subset() -> Path:
    """Real CIFAR-10 images (official python layout) shipped beside the repo in ../shared.

    Missing data fails the tests that need it: a green run must mean they ran. Set
    ``FLGC_SKIP_DATA_TESTS=1`` to skip them knowingly on a machine without the subset.
    """
    if not (SUBSET / "cifar-10-batches-py" / "test_batch").is_file():
        message = (f"real CIFAR-10 subset not found at {SUBSET} (see README: Tests); "
                   "set FLGC_SKIP_DATA_TESTS=1 to skip the tests that need it")
        if os.environ.get("FLGC_SKIP_DATA_TESTS") == "1":
            pytest.skip(message)
        pytest.fail(message)
    return SUBSET


def run_cli(*args: str, cwd: Path = REPO, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run a documented command line (``python train.py ...``) exactly as a user would."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-4000:]}")
    return proc


# Settings that keep a real-data run to a few seconds of training on 2 CPU cores.
TINY = (
    "data.limit_train=64", "data.limit_test=32", "data.batch_size=32",
    "trainer.accelerator=cpu", "logger=csv", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
)


# Small deterministic CPU runs for the kill / stop / resume tests: width 0.25, batches of 32, 2 epochs.
BASE = (*TINY, "model.width_mult=0.25", "trainer.deterministic=true", "trainer.max_epochs=2")
# 3 steps per epoch; validation in 4 batches of 8, so a stop signal during validation meets a batch that is not the
# last one (Lightning itself stops after any batch but the last: one batch would hide a missing deferral).
SHORT = (*BASE, "data.limit_train=96", "data.eval_batch_size=8")


def probe(path: Path, pause: float = 0.0) -> tuple[str, ...]:
    """Overrides adding tests/probes.py's StepRecorder (one JSON line per step and validation start/end)."""
    return ("+callbacks.probe._target_=tests.probes.StepRecorder", f"+callbacks.probe.path={path}",
            f"+callbacks.probe.pause_in_validation={pause}")


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, cifar_subset) -> tuple[Path, Path]:
    """The uninterrupted SHORT run (run directory, its step records) that the stopped, killed and requeued runs
    must end identical to, trained once for all of them. Their checkpoint intervals differ from its own (the
    default): where checkpoints are written does not change what a run computes, so this is checked too."""
    folder = tmp_path_factory.mktemp("reference")
    run_cli("train.py", f"data.root={cifar_subset}", *SHORT, *probe(folder / "full.jsonl"),
            f"hydra.run.dir={folder / 'full'}")
    return folder / "full", folder / "full.jsonl"
