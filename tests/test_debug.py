"""The debug presets (``debug=fast|overfit|limit|profiler``): each composes and runs on the quickstart's digits."""
from __future__ import annotations

import json

import pytest
import torch

from flgc_lightning.config import CONFIG_DIR, compose
from flgc_lightning.training.run import train

PRESETS = ("fast", "overfit", "limit", "profiler")


@pytest.fixture
def run(tmp_path):
    """Train in this process with the quickstart, a preset and ``run_dir`` in ``tmp_path`` (torch threads restored)."""
    threads = torch.get_num_threads()

    def _run(*overrides: str) -> dict:
        cfg = compose("train", ["experiment=quickstart", "num_threads=null", "logger=csv", "model.width_mult=0.25",
                                "trainer.enable_progress_bar=false", f"run_dir={tmp_path}", *overrides])
        return train(cfg)

    yield _run
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", PRESETS)
def test_each_preset_says_what_it_is_in_one_line(name):
    lines = (CONFIG_DIR / "debug" / f"{name}.yaml").read_text().splitlines()
    assert lines[0] == "# @package _global_" and lines[1].startswith(f"# debug={name}: ")
    cfg = compose("train", [f"debug={name}"], return_hydra_config=True)
    assert cfg.hydra.run.dir.startswith("outputs/debug/") and cfg.test_after_fit is True


def test_fast_runs_one_batch_of_each_split(run, tmp_path):
    metrics = run("debug=fast")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [h["epoch"] for h in summary["history"]] == [0] and summary["status"] == "finished"
    assert "test/acc" in metrics and "val/acc" in metrics  # tested on the weights as they are: no best checkpoint
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["last.ckpt"]  # Lightning's save at train end
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 1


def test_overfit_fits_two_fixed_unaugmented_batches(run, tmp_path):
    cfg = compose("train", ["experiment=quickstart", "debug=overfit", f"run_dir={tmp_path}"])
    assert (cfg.data.limit_train, cfg.data.batch_size, cfg.data.augment, cfg.trainer.overfit_batches) == (64, 32, False, 2)
    run("debug=overfit", "trainer.max_epochs=14", "model.width_mult=0.5")
    history = json.loads((tmp_path / "summary.json").read_text())["history"]
    assert len(history) == 14
    assert history[-1]["train_acc"] >= 0.95 and history[-1]["train_loss"] < 0.3 * history[0]["train_loss"]
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 14 * 2  # two batches per epoch


def test_limit_runs_three_short_epochs_then_tests(run, tmp_path):
    metrics = run("debug=limit")
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 9
    assert "test/acc" in metrics


def test_profiler_writes_its_report_into_the_run_directory(run, tmp_path):
    run("debug=profiler", "trainer.limit_train_batches=3")
    report = (tmp_path / "fit-profile.txt").read_text()
    assert "run_training_epoch" in report and "Total" in report


@pytest.mark.parametrize("augment", [False, True])
def test_augment_false_feeds_the_training_images_unchanged(augment):
    """``data.augment=false`` (debug=overfit): training batches are the images themselves, only normalised."""
    from flgc_lightning.data.augment import normalize
    from flgc_lightning.data.digits import DigitsDataModule

    dm = DigitsDataModule(batch_size=32, limit_train=64, augment=augment, hflip=True)
    dm.setup()
    mean, std = (torch.tensor(v) for v in (dm.transform.mean, dm.transform.std))
    seen = 0
    for batch in dm.train_dataloader():
        images, labels = dm.on_after_batch_transfer(batch, 0)
        plain = normalize(batch.images, mean, std)
        assert torch.equal(images, plain) is (not augment)  # random crops move pixels when augmenting
        seen += len(labels)
    assert seen == 64
