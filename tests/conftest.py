"""Shared fixtures: repo paths, the shared real CIFAR-10 subset, and a subprocess runner."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SUBSET = REPO.parent / "shared" / "data" / "cifar10-subset"


@pytest.fixture(scope="session")
def cifar_subset() -> Path:
    """Real CIFAR-10 images (official python layout) shipped beside the repo in ../shared."""
    if not (SUBSET / "cifar-10-batches-py" / "test_batch").is_file():
        pytest.skip(f"real CIFAR-10 subset not found at {SUBSET}")
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
    "data.num_workers=0", "data.limit_train=128", "data.limit_test=64", "data.batch_size=64",
    "trainer.accelerator=cpu", "logger=csv", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
)
