"""Hyperparameter search (``hparams_search=optuna``): what train.py returns, the refusals, and a real search of 3 trials
on the quickstart's digits, killed part-way and continued by the same command."""
from __future__ import annotations

import json
import math
import os
import signal
import time

import pytest
import torch

from conftest import run_cli, start_cli
from flgc_lightning.config import compose
from flgc_lightning.errors import ConfigError, NonFiniteLossError
from flgc_lightning.search import search_space
from flgc_lightning.training import objective


def search_cfg(tmp_path, *overrides):
    return compose("train", ["hparams_search=optuna", "experiment=quickstart", "data.val_size=300",
                             f"run_dir={tmp_path}", *overrides])


def test_the_search_space_of_the_config_and_fixed_overrides():
    cfg = compose("train", ["hparams_search=optuna"], return_hydra_config=True)
    params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
    space, fixed = search_space(params + ["data.val_size=300", "model.width_mult=choice(0.25,0.5)",
                                          "seed=range(0,3)", "groups=tag(int, interval(2, 8))"])
    assert space["optimizer.lr"].log and (space["optimizer.lr"].low, space["optimizer.lr"].high) == (0.005, 0.5)
    assert set(space) == {"optimizer.lr", "optimizer.weight_decay", "assign_optim.lr_mult", "model.width_mult",
                          "seed", "groups"}
    assert space["model.width_mult"].choices == (0.25, 0.5) and (space["seed"].low, space["seed"].high) == (0, 2)
    assert (space["groups"].low, space["groups"].high) == (2, 8) and fixed == ["data.val_size=300"]
    assert cfg.hydra.sweeper.direction == "maximize" and cfg.optimized_metric == "best_val_acc"


@pytest.mark.parametrize("overrides, direction, message", [
    (("data.val_size=null",), "maximize", "data.val_size is null, so validation runs on the test split"),
    (("optimized_metric=test/acc",), "maximize", "must not select on test or training metrics"),
    (("optimized_metric=val/loss",), "maximize", "does not fit optimized_metric=val/loss"),
    ((), None, "hydra.sweeper.direction must say maximize or minimize"),
    (("callbacks.run_summary=null",), "maximize", "callbacks.run_summary must be on"),
])
def test_a_search_that_would_select_on_the_wrong_thing_is_refused(tmp_path, overrides, direction, message):
    with pytest.raises(ConfigError, match="invalid hyperparameter search") as err:
        objective.check_search(search_cfg(tmp_path, *overrides), direction)
    assert message in str(err.value)
    objective.check_search(search_cfg(tmp_path, "optimized_metric=val/loss"), "minimize")  # a sound one passes


def test_a_failed_trial_scores_the_worst_value_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setattr(objective, "sweeper_direction", lambda: "maximize")
    cfg = search_cfg(tmp_path)

    def diverges(_):
        raise NonFiniteLossError("training loss is not finite at global step 3")

    assert objective.run_and_score(cfg, diverges) == -math.inf
    assert "not finite at global step 3" in (tmp_path / "error.txt").read_text()
    assert objective.run_and_score(cfg, lambda _: {}) == -math.inf  # no validation metric: worst, never NaN
    monkeypatch.setattr(objective, "sweeper_direction", lambda: "minimize")
    assert objective.run_and_score(search_cfg(tmp_path, "optimized_metric=val/loss"),
                                   lambda _: {"val/loss": float("nan")}) == math.inf

    def bad_config(_):
        raise ConfigError("optimizer.lr must be > 0")  # every trial would hit it: the search stops

    monkeypatch.setattr(objective, "sweeper_direction", lambda: "maximize")
    with pytest.raises(ConfigError):
        objective.run_and_score(cfg, bad_config)


def test_a_plain_run_returns_its_best_validation_accuracy_not_nan(tmp_path):
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"best_val_acc": 0.75, "last_val_acc": 0.5}))
    cfg = compose("train", ["experiment=quickstart", f"run_dir={tmp_path}"])
    assert objective.run_and_score(cfg, lambda _: {"val/acc": 0.5}) == 0.75
    summary.unlink()
    assert objective.run_and_score(cfg, lambda _: {}) == -math.inf


SEARCH = ("-m", "hparams_search=optuna", "experiment=quickstart", "data.val_size=300", "model.width_mult=0.25",
          "data.limit_train=96", "trainer.max_epochs=2", "trainer.enable_progress_bar=false", "logger=csv",
          "test_after_fit=false", "callbacks.step_checkpoint.every_n_train_steps=1", "hydra.sweeper.n_trials=3")


@pytest.mark.slow
def test_an_optuna_search_of_three_trials_killed_and_continued_by_the_same_command(tmp_path):
    import optuna

    sweep = tmp_path / "search"
    proc = start_cli("train.py", *SEARCH, f"hydra.sweep.dir={sweep}")
    last = sweep / "1" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # kill it inside trial 1, after its second step
        try:
            if torch.load(last, weights_only=True)["global_step"] >= 2:
                break
        except Exception:
            pass
        time.sleep(0.02)
    assert proc.poll() is None, "the search ended before trial 1 got under way"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(last, weights_only=True)["global_step"]
    assert killed_at < 6  # trial 1 (2 epochs of 3 steps) was cut short

    again = run_cli("train.py", *SEARCH, f"hydra.sweep.dir={sweep}")
    out = again.stdout + again.stderr
    assert "continuing trial 1" in out and "1 of 3 trials done" in out
    study = optuna.load_study(study_name="flgc", storage=f"sqlite:///{sweep / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    for trial in study.trials:  # each trial's value is its held-out best validation accuracy, in its own folder
        summary = json.loads((sweep / str(trial.number) / "summary.json").read_text())
        assert summary["status"] == "finished" and summary["config"]["val_size"] == 300
        assert trial.value == summary["best_val_acc"]
        assert summary["config"]["optimizer"]["lr"] == pytest.approx(trial.params["optimizer.lr"])
    resumed = json.loads((sweep / "1" / "summary.json").read_text())["resumed_from"]
    assert resumed == str(last)  # trial 1 continued from its own checkpoint, not from scratch
    assert torch.load(last, weights_only=True)["global_step"] == 6
    best = (sweep / "optimization_results.yaml").read_text()
    assert f"best_trial: {study.best_trial.number}" in best

    finished = run_cli("train.py", *SEARCH, f"hydra.sweep.dir={sweep}")  # a finished search: nothing more runs
    assert "3 of 3 trials done" in finished.stdout + finished.stderr and "Launching" not in finished.stdout + finished.stderr
    assert len(optuna.load_study(study_name="flgc", storage=f"sqlite:///{sweep / 'optuna.db'}").trials) == 3

    report = run_cli("-m", "flgc_lightning.report", str(sweep))  # read like any other multirun
    rows = [line for line in report.stdout.splitlines() if line.startswith("| ") and "finished" in line]
    assert len(rows) == 3


@pytest.mark.slow
def test_a_search_validating_on_the_test_split_is_refused_before_anything_runs(tmp_path):
    sweep = tmp_path / "search"
    proc = run_cli("train.py", "-m", "hparams_search=optuna", "experiment=quickstart", f"hydra.sweep.dir={sweep}",
                   check=False)
    assert proc.returncode == 1
    assert "error: invalid hyperparameter search" in proc.stderr and "data.val_size=N" in proc.stderr
    assert "Traceback" not in proc.stderr and not sweep.exists()
