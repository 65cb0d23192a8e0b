"""MLflow and W&B loggers: offline by default, the whole config as parameters, and one tracker run per run directory
(a resume continues it). Read back through MLflow's own client and W&B's offline run files."""
from __future__ import annotations

import csv
import json
import sys

import pytest
import torch

from conftest import run_cli
from flgc_lightning.config import compose
from flgc_lightning.errors import ConfigError
from flgc_lightning.trackers import RUN_IDS_FILE, flatten, merged_config, remember_run_id
from flgc_lightning.training.schema import instantiate_checked
from flgc_lightning.training.validation import validate_config
from wandb_offline import read_run


@pytest.mark.parametrize("choice, names", [
    ("logger=mlflow", ["mlflow"]), ("logger=wandb", ["wandb"]), ("logger=[csv,mlflow]", ["csv", "mlflow"]),
    ("logger=many_loggers", ["csv", "tensorboard", "mlflow", "wandb"]),
])
def test_logger_choices_compose_and_pass_the_schema(choice, names):
    cfg = compose("train", [choice, "run_dir=/tmp/unused"])
    assert list(cfg.logger) == names
    validate_config(cfg)  # every key checked against the tracker classes' signatures
    if "mlflow" in names:
        assert cfg.logger.mlflow.tracking_uri is None  # offline: the run directory's own store
    if "wandb" in names:
        assert cfg.logger.wandb.offline is True


def test_a_missing_tracker_package_is_a_config_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow now fails as if it were not installed
    cfg = compose("train", ["logger=mlflow", f"run_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"logger.mlflow: logger=mlflow needs MLflow: pip install"):
        instantiate_checked(cfg.logger.mlflow, "logger.mlflow")
    assert not list(tmp_path.iterdir())


def test_only_rank_zero_records_the_tracker_run(monkeypatch, tmp_path):
    from pytorch_lightning.utilities import rank_zero_only

    monkeypatch.setattr(rank_zero_only, "rank", 1)
    remember_run_id(tmp_path, "mlflow", {"run_id": "abc"})
    assert not (tmp_path / RUN_IDS_FILE).exists()
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    remember_run_id(tmp_path, "mlflow", {"run_id": "abc"})
    assert json.loads((tmp_path / RUN_IDS_FILE).read_text()) == {"mlflow": {"run_id": "abc"}}


@pytest.mark.slow
def test_mlflow_and_wandb_offline_with_a_resume_continuing_the_same_runs(tmp_path):
    from mlflow.tracking import MlflowClient

    run = tmp_path / "run"
    args = ("experiment=quickstart", "model.width_mult=0.25", "data.limit_train=96", "trainer.enable_progress_bar=false",
            "logger=many_loggers", "test_after_fit=false")
    run_cli("train.py", *args, "trainer.max_epochs=1", f"hydra.run.dir={run}")
    first = json.loads((run / RUN_IDS_FILE).read_text())
    run_cli("train.py", *args, "trainer.max_epochs=2", "test_after_fit=true", f"ckpt_path={run}/checkpoints/last.ckpt")
    ids = json.loads((run / RUN_IDS_FILE).read_text())
    assert ids == first  # the resume logged into the same tracker runs
    assert ids["mlflow"]["tracking_uri"] == f"sqlite:///{run / 'mlflow.db'}"

    # MLflow: one run in the run directory's store holding both processes' metrics
    client = MlflowClient(ids["mlflow"]["tracking_uri"])
    assert [r.info.run_id for r in client.search_runs([ids["mlflow"]["experiment_id"]])] == [ids["mlflow"]["run_id"]]
    mlflow_run = client.get_run(ids["mlflow"]["run_id"])
    assert mlflow_run.info.status == "FINISHED"
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    first_config = merged_config(torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["flgc_config"],
                                 ckpt["hyper_parameters"])
    expected = {k: str(v) for k, v in flatten(first_config).items()}
    expected["trainer.max_epochs"], expected["ckpt_path"] = "1", "None"  # params keep the first run's values
    expected["scheduler.T_max"], expected["test_after_fit"] = "1", "False"
    assert mlflow_run.data.params == expected  # the whole composed config, flattened, with filled-in values
    assert mlflow_run.data.params["model.num_classes"] == "10" and mlflow_run.data.params["optimizer.lr"] == "0.02"
    with open(sorted((run / "csv").glob("version_*/metrics.csv"))[-1]) as fh:  # the resumed process's CSV log
        csv_val = [float(r["val/acc"]) for r in csv.DictReader(fh) if r.get("val/acc")]
    history = {name: [(m.step, m.value) for m in client.get_metric_history(mlflow_run.info.run_id, name)]
               for name in ("val/acc", "train/loss", "test/acc", "model/params", "model/macs_learned",
                            "assign/moved_total")}
    assert [s for s, _ in history["val/acc"]] == [2, 5] and history["val/acc"][-1][1] == pytest.approx(csv_val[-1])
    assert len(history["train/loss"]) == 2 and len(history["test/acc"]) == 1 and len(history["assign/moved_total"]) == 2
    assert history["model/params"][0][1] == ckpt_params(ckpt) and history["model/macs_learned"]

    # W&B: two offline folders (first run, resume) of the same run id, with the config and both epochs' metrics
    folders = sorted((run / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(f.name.endswith(ids["wandb"]["id"]) for f in folders)
    runs = [read_run(next(f.glob("*.wandb"))) for f in folders]
    assert {r["id"] for r in runs} == {ids["wandb"]["id"]}
    assert runs[0]["config"]["optimizer"]["lr"] == 0.02 and runs[0]["config"]["model"]["num_classes"] == 10
    val = [(h["trainer/global_step"], h["val/acc"]) for r in runs for h in r["history"] if "val/acc" in h]
    assert [s for s, _ in val] == [2, 5] and val[-1][1] == pytest.approx(csv_val[-1])
    assert any("model/params" in h for h in runs[0]["history"]) and any("test/acc" in h for h in runs[1]["history"])


def ckpt_params(ckpt: dict) -> float:
    return float(sum(v.numel() for k, v in ckpt["state_dict"].items()
                     if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))))
