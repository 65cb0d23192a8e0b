"""The documented command lines, run as a user would, on tiny slices of real CIFAR-10."""
from __future__ import annotations

import csv

import pytest
import torch

from conftest import TINY, run_cli
from flgc_lightning.training.evaluate import epochs_trained

pytestmark = pytest.mark.slow


def read_metrics(run_dir):
    rows = []
    for path in sorted((run_dir / "csv").glob("version_*/metrics.csv")):
        with open(path) as fh:
            rows.append([r for r in csv.DictReader(fh)])
    return rows


def test_train_resume_test(tmp_path, cifar_subset):
    run_dir = tmp_path / "run"
    data = f"data.root={cifar_subset}"
    first = run_cli("train.py", "model.use_flgc=true", "groups=8", data, "trainer.max_epochs=1", *TINY,
                    f"hydra.run.dir={run_dir}")
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.is_file(), first.stdout
    assert "macs=94.99 M" in first.stdout + first.stderr
    ckpt = torch.load(last, map_location="cpu", weights_only=True)  # plain types only
    assert ckpt["global_step"] == 2 and epochs_trained(ckpt) == 1
    assert ckpt["flgc_config"]["model"]["groups"] == 8 and ckpt["hyper_parameters"]["model"]["use_flgc"] is True
    best_before = ckpt["callbacks"]

    resumed = run_cli("train.py", data, "trainer.max_epochs=2", *TINY, f"ckpt_path={last}")
    out = resumed.stdout + resumed.stderr
    assert "Restored all states from the checkpoint" in out
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4  # two more steps: epoch 1 only
    assert epochs_trained(ckpt) == 2
    assert ckpt["lr_schedulers"][0]["last_epoch"] == 2
    assert (run_dir / ".hydra" / "config.yaml").is_file() and list((run_dir / ".hydra").glob("resume-*"))
    versions = read_metrics(run_dir)
    assert len(versions) == 2
    assert {r["epoch"] for r in versions[1] if r.get("val/acc")} == {"1"}  # resumed run logs epoch 1 only
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["best-epoch000.ckpt", "last.ckpt"] or names == ["best-epoch001.ckpt", "last.ckpt"], names
    model_ckpt_state = [v for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint")][0]
    assert model_ckpt_state["best_model_score"] is not None and best_before

    tested = run_cli("test.py", f"ckpt_path={last}", data, "data.num_workers=0", "data.limit_test=32",
                     "trainer.accelerator=cpu", f"hydra.run.dir={tmp_path / 'test'}")
    assert "test acc" in tested.stdout and "%" in tested.stdout
    assert "params     : 2,364,954" in tested.stdout
    assert (tmp_path / "test" / "test_results.json").is_file()


def test_tiny_multirun_sweep_runs_every_point_even_after_an_invalid_one(tmp_path, cifar_subset):
    sweep = tmp_path / "sweep"
    proc = run_cli("train.py", "-m", "model.use_flgc=false", "groups=3,1,2", f"data.root={cifar_subset}",
                   "trainer.max_epochs=1", *TINY, f"hydra.sweep.dir={sweep}", check=False)
    assert proc.returncode != 0  # the sweep as a whole reports the failure...
    assert "error: invalid configuration" in proc.stderr and "divisible by groups=3" in proc.stderr
    assert not (sweep / "0" / "checkpoints").exists()
    for job, groups in (("1", 1), ("2", 2)):  # ...after running the valid points
        ckpt = torch.load(sweep / job / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert ckpt["flgc_config"]["groups"] == groups
    assert (sweep / "multirun.yaml").is_file()
