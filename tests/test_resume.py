"""Exact resume under the default settings: a run killed at any moment and resumed ends bit-identical.

Every case runs the real command lines: an uninterrupted run, the same run killed (SIGKILL) at a chosen
moment, then resumed with ``ckpt_path=``. A probe callback (``tests/probes.py``) records each process's
training steps, so the tests also check that the resume continued from the saved step rather than
starting over.
"""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import BASE, SHORT, probe, run_cli, start_cli
from probes import hold, read_records

pytestmark = pytest.mark.slow


def wait_until(condition, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before the moment to stop it")
        time.sleep(0.02)
    raise AssertionError("timed out waiting for the moment to stop the run")


def last_step(ckpt: Path) -> int:
    try:
        return torch.load(ckpt, weights_only=True)["global_step"]
    except Exception:  # not there yet, or being replaced this instant
        return -1


def val_metrics(run_dir: Path) -> list[tuple[str, str, str]]:
    rows = []
    for path in sorted((run_dir / "csv").glob("version_*/metrics.csv")):
        with open(path) as fh:
            rows += [(r["epoch"], r["val/acc"], r["val/loss"]) for r in csv.DictReader(fh) if r.get("val/acc")]
    return sorted(rows)


def assert_same_run(full: Path, cut: Path) -> None:
    a = torch.load(full / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(cut / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"]
    differing = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not differing, f"{len(differing)} of {len(a['state_dict'])} tensors differ, e.g. {differing[:3]}"
    for x, y in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert torch.equal(x["momentum_buffer"], y["momentum_buffer"])
    assert a["lr_schedulers"] == b["lr_schedulers"]
    assert val_metrics(full) == val_metrics(cut)  # every epoch's validation metrics
    if (full / "assignments.jsonl").exists():
        assert (cut / "assignments.jsonl").read_text() == (full / "assignments.jsonl").read_text()


def kill_and_resume(tmp_path: Path, args: tuple, stop_when=None, pause: float = 0.0, reference=None,
                    hold_step: int | None = None) -> dict:
    """Uninterrupted run (or ``reference``: its run directory and step records), the same run SIGKILLed when
    ``stop_when(records, last.ckpt)`` holds, or, with ``hold_step``, once it holds still after that step's
    checkpoint (tests/probes.py's HoldAtStep: no window to miss), and its resume."""
    assert (stop_when is None) != (hold_step is None), "give stop_when or hold_step"
    full, full_records = reference or (tmp_path / "full", tmp_path / "full.jsonl")
    if reference is None:
        run_cli("train.py", *args, *probe(full_records, pause), f"hydra.run.dir={full}", plain=True)
    cut, steps = tmp_path / "cut", tmp_path / "cut.jsonl"
    last, held = cut / "checkpoints" / "last.ckpt", tmp_path / "held"
    holding = hold(last, hold_step, held) if hold_step is not None else ()
    proc = start_cli("train.py", *args, *probe(steps, pause), f"hydra.run.dir={cut}", *holding)
    if hold_step is not None:
        wait_until(held.exists, proc)
    else:
        wait_until(lambda: steps.exists() and stop_when(read_records(steps), last), proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = read_records(steps)
    saved_step = last_step(last)
    run_cli("train.py", *args, *probe(steps, pause), f"ckpt_path={last}")
    resumed = [r for r in read_records(steps)[len(killed):] if r["event"] == "step"]
    total = [r for r in read_records(full_records) if r["event"] == "step"]
    # the resumed process continued from the checkpoint: its first step is the saved one + 1
    assert resumed and resumed[0]["step"] == saved_step + 1, (saved_step, resumed[:2])
    assert [r["step"] for r in resumed] == [r["step"] for r in total][saved_step:]
    assert_same_run(full, cut)
    return {"killed": killed, "saved_step": saved_step}


def steps_done(records) -> int:
    return max((r["step"] for r in records if r["event"] == "step"), default=0)


@pytest.mark.parametrize("data", [(), ("data.resident=false", "data.num_workers=2")],
                         ids=["default-data-settings", "worker-processes"])
def test_killed_mid_epoch(tmp_path, cifar_subset, reference_run, data):
    """An interval of 2 steps in a 3-step epoch, killed once the mid-epoch checkpoint is on disk; the default data
    path (images resident, no workers) and the loader path with worker processes. Both end identical to the
    uninterrupted run on the default path: what a run trains on does not depend on workers."""
    result = kill_and_resume(
        tmp_path, (f"data.root={cifar_subset}", *SHORT, *data, "callbacks.step_checkpoint.every_n_train_steps=2"),
        hold_step=2, reference=reference_run)
    assert result["saved_step"] == 2  # mid epoch 0 (3 steps per epoch)
    # killed inside epoch 0's training part, before its validation began (the checkpoint it resumes from is
    # the mid-epoch one, not one written at an epoch end)
    assert 2 <= steps_done(result["killed"]) <= 3
    assert not any(r["event"].startswith("validation") for r in result["killed"])


def test_killed_right_after_an_end_of_epoch_checkpoint_with_worker_processes(tmp_path, cifar_subset):
    """The issue's case: loader workers, trainer.limit_train_batches, killed once epoch 0's final checkpoint is on disk."""
    result = kill_and_resume(
        tmp_path, (f"data.root={cifar_subset}", *BASE, "data.resident=false", "data.num_workers=2",
                   "trainer.limit_train_batches=4", "data.limit_train=null"),
        lambda records, last: any(r["event"] == "validation_end" for r in records) and last_step(last) == 4)
    assert result["saved_step"] == 4


def test_killed_during_validation_with_data_limit_and_an_interval_that_does_not_divide_the_epoch(tmp_path, cifar_subset):
    """data.limit_train=200 gives 7 steps per epoch; checkpoints every 3 steps; killed while epoch 1 validates."""
    result = kill_and_resume(
        tmp_path, (f"data.root={cifar_subset}", *BASE, "data.limit_train=200",
                   "callbacks.step_checkpoint.every_n_train_steps=3"),
        lambda records, last: sum(r["event"] == "validation_start" for r in records) == 2
        and records[-1]["event"] == "validation_start",
        pause=0.5)
    killed = result["killed"]
    assert killed[-1]["event"] == "validation_start" and steps_done(killed) == 14
    assert result["saved_step"] == 12  # the last step checkpoint of epoch 1; its validation never finished


def test_gumbel_estimator_with_regroups_and_a_freeze_resumes_bit_identical(tmp_path, cifar_subset):
    """Gumbel noise lives in unsaved buffers drawn from (seed, step, layer): the resumed process redraws the same
    noise. Killed mid-epoch 0, which learns with noise; epoch 1 is frozen (assign_optim.freeze_epoch=1). Both
    epochs start with a regroup: the resume inside epoch 0 must not regroup again, epoch 1's must happen."""
    result = kill_and_resume(
        tmp_path, (f"data.root={cifar_subset}", *BASE, "data.limit_train=96",
                   "callbacks.step_checkpoint.every_n_train_steps=2", "model.assign_grad=gumbel",
                   "model.dense_weight_grad=true", "assign_optim.lr_mult=20", "assign_optim.freeze_epoch=1",
                   "assign_optim.regroup_epochs=[0,1]"),
        hold_step=2)
    assert result["saved_step"] == 2
    full = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=True)
    assert full["hyper_parameters"]["model"]["assign_grad"] == "gumbel"
    assert full["hyper_parameters"]["assign_optim"]["freeze_epoch"] == 1
