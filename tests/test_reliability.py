"""Never lose a run: exact resume after SIGKILL, atomic checkpoints, clear errors on bad input."""
from __future__ import annotations

import csv
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY, run_cli
from flgc_lightning.errors import CheckpointError
from flgc_lightning.training.checkpoint_io import AtomicCheckpointIO
from flgc_lightning.training.checkpoints import load_checkpoint

# Deterministic CPU run: 3 steps per epoch, a checkpoint after every optimizer step.
EXACT = (*TINY, "data.limit_train=96", "trainer.max_epochs=2", "trainer.deterministic=true",
         "callbacks.step_checkpoint.every_n_train_steps=1")


def snapshot(folder: Path) -> dict[str, str]:
    """Content hash of every file under a folder."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_untouched(before: dict[str, str], folder: Path) -> None:
    after = snapshot(folder)
    changed = [name for name, digest in before.items() if after.get(name) != digest]
    assert not changed, f"overwritten or deleted: {changed}"
    assert not list((folder / ".hydra").glob("resume-*")), "a failed resume left its record behind"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, cifar_subset) -> Path:
    """One tiny finished run (1 epoch) whose checkpoints the error tests poke at."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    run_cli("train.py", f"data.root={cifar_subset}", "trainer.max_epochs=1", *TINY, f"hydra.run.dir={run_dir}")
    return run_dir


def val_metrics(run_dir: Path) -> list[tuple[str, str, str]]:
    rows = []
    for path in sorted((run_dir / "csv").glob("version_*/metrics.csv")):
        with open(path) as fh:
            rows += [(r["epoch"], r["val/acc"], r["val/loss"]) for r in csv.DictReader(fh) if r.get("val/acc")]
    return rows


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path, cifar_subset):
    """The README's reliability sequence: kill mid-epoch, resume from last.ckpt, compare with an uninterrupted run."""
    data = f"data.root={cifar_subset}"
    run_cli("train.py", data, *EXACT, f"hydra.run.dir={tmp_path / 'full'}")

    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "train.py", data, *EXACT, f"hydra.run.dir={cut}"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = cut / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while time.time() < deadline:  # kill as soon as a mid-epoch-0 checkpoint (step 2 of 3) is on disk
        if last.exists() and torch.load(last, weights_only=True)["global_step"] >= 2:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(last, weights_only=True)["global_step"]
    assert killed_at < 6, "the run finished before it could be killed"

    run_cli("train.py", data, *EXACT, f"ckpt_path={last}")
    full = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=True)
    resumed = torch.load(last, weights_only=True)
    assert resumed["global_step"] == full["global_step"] == 6
    for key, tensor in full["state_dict"].items():
        assert torch.equal(tensor, resumed["state_dict"][key]), key
    for a, b in zip(full["optimizer_states"][0]["state"].values(), resumed["optimizer_states"][0]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert full["lr_schedulers"] == resumed["lr_schedulers"]
    assert val_metrics(tmp_path / "full") == val_metrics(cut)  # every epoch's validation metrics
    records = (tmp_path / "full" / "assignments.jsonl").read_text()
    assert records.count("\n") == 17 * 3  # init + 2 epochs for each of the 17 FLGC layers
    assert (cut / "assignments.jsonl").read_text() == records  # the assignment records too


def test_last_checkpoint_is_current_after_every_epoch_but_never_mid_last_batch(tmp_path):
    """last.ckpt after each epoch's validation and every step, except at the end of an epoch's last
    batch: Lightning would treat that checkpoint as a finished epoch and skip its validation on resume."""
    import pytorch_lightning as pl
    from pytorch_lightning.demos.boring_classes import BoringModel

    from flgc_lightning.callbacks import StepCheckpoint

    saves = []

    class Spy(pl.Callback):
        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            progress = trainer.fit_loop.epoch_loop.batch_progress
            saves.append((trainer.global_step, progress.is_last_batch, progress.current.completed == progress.current.processed))

    def fit(every_n_train_steps):
        saves.clear()
        callback = StepCheckpoint(dirpath=tmp_path / str(every_n_train_steps), every_n_train_steps=every_n_train_steps,
                                  save_top_k=0, save_last=True)
        trainer = pl.Trainer(default_root_dir=tmp_path, max_epochs=3, limit_train_batches=3, limit_val_batches=1,
                             callbacks=[callback, Spy()], logger=False, enable_progress_bar=False,
                             enable_model_summary=False)
        trainer.fit(BoringModel())
        return torch.load(tmp_path / str(every_n_train_steps) / "last.ckpt", weights_only=True)

    assert fit(1)["global_step"] == 9
    assert [step for step, _, _ in saves] == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    # Steps 3, 6, 9 end an epoch: saved only once that batch is complete and validation has run.
    assert all(batch_done for _, last_batch, batch_done in saves if last_batch)
    assert fit(100)["global_step"] == 9  # no step trigger: still current after every epoch
    assert [step for step, _, _ in saves] == [3, 6, 9]


def test_atomic_write_keeps_the_old_file_when_a_write_dies(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, target)
    good = target.read_bytes()

    def dying_save(obj, fh, *args, **kwargs):
        fh.write(b"partial bytes")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, target)
    assert target.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary left behind


def test_atomic_io_is_what_the_trainer_uses():
    from flgc_lightning.config import compose

    cfg = compose("train")
    assert [p._target_ for p in cfg.trainer.plugins] == ["flgc_lightning.training.checkpoint_io.AtomicCheckpointIO"]


BROKEN = {
    "truncated": lambda good: good[: len(good) // 2],
    "corrupt": lambda good: bytes(b ^ 0x5A for b in good[:4096]) + good[4096:],
    "foreign": None,  # a valid torch file that is not our checkpoint
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", [*BROKEN, "missing"])
def test_broken_checkpoints_give_one_clear_error_and_touch_nothing(kind, trained_run, tmp_path, cifar_subset):
    good = (trained_run / "checkpoints" / "last.ckpt").read_bytes()
    bad = trained_run / "checkpoints" / f"{kind}.ckpt"
    if kind == "foreign":
        torch.save({"weights": torch.ones(2)}, bad)
    elif kind != "missing":
        bad.write_bytes(BROKEN[kind](good))
    before = snapshot(trained_run)
    for script in ("train.py", "test.py"):
        proc = run_cli(script, f"ckpt_path={bad}", f"data.root={cifar_subset}", "data.num_workers=0",
                       check=False, timeout=120)
        assert proc.returncode != 0
        message = proc.stderr.strip().splitlines()[-1]
        assert message.startswith("error: checkpoint") and str(bad) in message, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
        expected = {"truncated": "truncated, corrupt", "corrupt": "truncated, corrupt",
                    "foreign": "not written by flgc-lightning", "missing": "does not exist"}[kind]
        assert expected in message
    assert_untouched(before, trained_run)


def test_test_py_without_a_checkpoint_says_how_to_call_it():
    proc = run_cli("test.py", check=False, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: no checkpoint given: run `python test.py ckpt_path=PATH/TO/last.ckpt`"


def test_load_checkpoint_messages(tmp_path):
    with pytest.raises(CheckpointError, match="is not a file"):
        load_checkpoint(tmp_path)
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(tmp_path / "empty.ckpt")


@pytest.mark.slow
def test_resume_with_a_different_structure_lists_the_conflicts(trained_run, cifar_subset):
    before = snapshot(trained_run)
    last = trained_run / "checkpoints" / "last.ckpt"
    proc = run_cli("train.py", f"ckpt_path={last}", "groups=4", "model.width_mult=0.5", f"data.root={cifar_subset}",
                   "data.num_workers=0", check=False, timeout=120)
    assert proc.returncode == 1
    assert "model.groups: checkpoint has 8, this run has 4" in proc.stderr
    assert "model.width_mult: checkpoint has 1.0, this run has 0.5" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert_untouched(before, trained_run)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["groups=0"], "invalid configuration:\n  - groups must be a positive integer, got 0\n"),
        (["groups=two"], "groups must be a positive integer, got 'two'"),
        (["model.use_flgc=false", "groups=3"], "features.1.conv.1.0 (32->16)"),
        (["data.batch_size=0"], "data.batch_size must be a positive integer"),
        (["data.root=/does/not/exist", "data.download=false"], "/does/not/exist/cifar-10-batches-py"),
        (["model.no_such_key=1"], "Could not override 'model.no_such_key'"),
        (["trainer.max_epochs=many"], "trainer.max_epochs must be an integer"),
    ],
)
def test_bad_command_lines_exit_nonzero_with_a_short_message(overrides, expected, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli("train.py", *overrides, f"hydra.run.dir={run_dir}", "data.num_workers=0", check=False, timeout=120)
    assert proc.returncode != 0
    assert expected in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not run_dir.exists()  # a command that failed before training leaves no run directory


def test_resume_setting_changes_are_listed():
    from flgc_lightning.training.validation import resume_setting_changes

    saved = {"seed": 1, "data": {"root": "a", "batch_size": 128}, "optimizer": {"lr": 0.1}, "trainer": {"max_epochs": 1}}
    now = {"seed": 1, "data": {"root": "b", "batch_size": 128}, "optimizer": {"lr": 0.01}, "trainer": {"max_epochs": 9}}
    assert resume_setting_changes(now, saved) == ["data.root: checkpoint 'a', now 'b'", "optimizer.lr: checkpoint 0.1, now 0.01"]
    assert resume_setting_changes(saved, saved) == []


def test_flgc_with_more_groups_than_channels_warns_but_is_allowed():
    import logging

    from flgc_lightning.config import compose
    from flgc_lightning.training.validation import validate_config

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("flgc_lightning.training.validation").addHandler(handler)
    try:
        validate_config(compose("train", ["groups=20"]))
    finally:
        logging.getLogger("flgc_lightning.training.validation").removeHandler(handler)
    assert any("features.1.conv.1.0 (32->16)" in r.getMessage() and "empty" in r.getMessage() for r in records)


@pytest.mark.slow
def test_non_finite_loss_stops_keeps_last_good_checkpoint_and_fails(tmp_path, cifar_subset):
    run_dir = tmp_path / "run"
    proc = run_cli("train.py", f"data.root={cifar_subset}", *TINY, "optimizer.lr=1e30", "trainer.max_epochs=3",
                   "callbacks.step_checkpoint.every_n_train_steps=1", f"hydra.run.dir={run_dir}", check=False)
    assert proc.returncode == 1
    message = proc.stderr.strip().splitlines()[-1]
    assert "training loss is" in message and "at global step" in message, proc.stderr[-2000:]
    step = int(message.split("at global step ")[1].split()[0])
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == step  # the checkpoint before the bad step is kept
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values() if t.is_floating_point())
