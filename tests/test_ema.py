"""Weight averaging (``callbacks=ema``): exact resume, and the averaged weights are what validation, test.py and
deploy use."""
from __future__ import annotations

import csv

import pytest
import torch
import torch.nn.functional as F

from conftest import BASE, run_cli
from flgc_lightning.config import compose
from flgc_lightning.errors import ConfigError
from flgc_lightning.training.schema import instantiate_checked
from test_end_to_end import independent_accuracy
from test_resume import kill_and_resume

pytestmark = pytest.mark.slow

EMA = ("callbacks=ema", "callbacks.ema.decay=0.8")


def test_ema_config_and_decay_check():
    cfg = compose("train", ["callbacks=ema", "callbacks.ema.decay=0.99", "run_dir=/tmp/unused"])
    assert set(cfg.callbacks) >= {"model_checkpoint", "step_checkpoint", "run_summary", "ema"}  # default ones kept
    assert instantiate_checked(cfg.callbacks.ema, "callbacks.ema").decay == 0.99
    with pytest.raises(ConfigError, match="callbacks.ema.decay must be a number between 0 and 1"):
        instantiate_checked(compose("train", ["callbacks=ema", "callbacks.ema.decay=1.0"]).callbacks.ema, "callbacks.ema")


def test_a_checkpoint_written_after_training_ended_keeps_the_raw_weights(tmp_path):
    """Lightning writes ``last.ckpt`` once more at train end when the best-checkpoint callback saved nothing in this
    process (here: ``debug=fast``; also a resumed run without a new best), after the average was copied into the
    model. The raw weights must still be the ``current_model_state`` there. The average starts after 5 steps, so
    after this run's single step it is still the initial network and differs from the trained one."""
    from flgc_lightning.training.run import train

    threads = torch.get_num_threads()
    try:
        train(compose("train", ["experiment=quickstart", "debug=fast", "num_threads=null", "model.width_mult=0.25",
                                "callbacks=ema", "callbacks.ema.update_starting_at_step=5", "logger=csv",
                                "trainer.enable_progress_bar=false", f"run_dir={tmp_path}"]))
    finally:
        torch.set_num_threads(threads)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 1 and int(ckpt["averaging_state"]["n_averaged"]) == 0
    raw, averaged = ckpt["current_model_state"], ckpt["state_dict"]
    assert any(not torch.equal(raw[k], averaged[k]) for k in raw if k.endswith("weight"))


def _net_outputs(checkpoint: dict, weights: str, root, count: int = 32):
    """Logits of the network built from the checkpoint's ``weights`` entry on the first ``count`` test images."""
    import pickle

    import numpy as np

    from flgc_lightning.models import MobileNetV2

    model_cfg = {k: v for k, v in checkpoint["hyper_parameters"]["model"].items() if k != "_target_"}
    net = MobileNetV2(**model_cfg)
    net.load_state_dict({k[len("net."):]: v for k, v in checkpoint[weights].items() if k.startswith("net.")})
    with open(root / "cifar-10-batches-py" / "test_batch", "rb") as fh:
        batch = pickle.load(fh, encoding="latin1")
    pixels = np.asarray(batch["data"][:count], dtype=np.float32).reshape(count, 3, 32, 32) / 255.0
    mean = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32)[:, None, None]
    std = np.array([0.2023, 0.1994, 0.2010], dtype=np.float32)[:, None, None]
    with torch.no_grad():
        return net.eval()(torch.from_numpy((pixels - mean) / std)), torch.tensor(batch["labels"][:count])


def test_killed_ema_run_resumes_bit_identically_and_every_reader_uses_the_average(tmp_path, cifar_subset):
    result = kill_and_resume(
        tmp_path, (f"data.root={cifar_subset}", *BASE, *EMA, "data.limit_train=96",
                   "callbacks.step_checkpoint.every_n_train_steps=2"),
        hold_step=2)
    assert result["saved_step"] == 2  # killed mid epoch 0; kill_and_resume checked state_dict (= the average),
    # momenta, schedules and every epoch's validation metrics against the uninterrupted run
    full = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=True)
    cut = torch.load(tmp_path / "cut" / "checkpoints" / "last.ckpt", weights_only=True)
    for key in full["current_model_state"]:  # the raw training weights too
        assert torch.equal(full["current_model_state"][key], cut["current_model_state"][key]), key
    assert torch.equal(full["averaging_state"]["n_averaged"], cut["averaging_state"]["n_averaged"])
    assert int(full["averaging_state"]["n_averaged"]) == full["global_step"] == 6  # one update per step
    raw, averaged = full["current_model_state"], full["state_dict"]
    assert any(not torch.equal(raw[k], averaged[k]) for k in raw)

    # Validation ran on the averaged weights: the last epoch's logged val/loss is the average's, not the raw one's.
    with open(sorted((tmp_path / "full" / "csv").glob("version_*/metrics.csv"))[-1]) as fh:
        logged = [float(r["val/loss"]) for r in csv.DictReader(fh) if r.get("val/loss")][-1]
    (avg_logits, labels), (raw_logits, _) = (_net_outputs(full, w, cifar_subset) for w in ("state_dict", "current_model_state"))
    avg_loss, raw_loss = (float(F.cross_entropy(x, labels)) for x in (avg_logits, raw_logits))
    assert abs(raw_loss - avg_loss) > 1e-3
    assert logged == pytest.approx(avg_loss, abs=1e-5)

    # test.py (its evaluate function) and the deploy step read the averaged weights.
    from flgc_lightning.deploy.checkpoint import load_trained_network
    from flgc_lightning.training.evaluate import evaluate

    last = tmp_path / "full" / "checkpoints" / "last.ckpt"
    overrides = [f"data.root={cifar_subset}", "data.limit_test=32"]
    tested = evaluate(compose("test", [f"ckpt_path={last}", *overrides, "trainer.accelerator=cpu",
                                       "trainer.enable_progress_bar=false", f"run_dir={tmp_path / 'test'}"]), overrides)
    assert tested["weights"] == "averaged (EMA)"
    assert tested["test_acc"] == pytest.approx(independent_accuracy(last, cifar_subset, 32), abs=1e-6)
    net, _ = load_trained_network(last)
    for name, value in net.state_dict().items():
        assert torch.equal(value, averaged[f"net.{name}"]), name


def test_test_after_fit_uses_the_average_and_a_resume_without_ema_is_refused(tmp_path, cifar_subset):
    import json

    from conftest import TINY

    run = tmp_path / "run"
    args = (f"data.root={cifar_subset}", *TINY, "model.width_mult=0.25", "trainer.max_epochs=1")
    run_cli("train.py", *args, *EMA, "test_after_fit=true", f"hydra.run.dir={run}")
    summary = json.loads((run / "summary.json").read_text())
    best = torch.load(summary["test_checkpoint"], weights_only=True)
    (avg_logits, labels), (raw_logits, _) = (_net_outputs(best, w, cifar_subset) for w in ("state_dict", "current_model_state"))
    assert abs(float(F.cross_entropy(raw_logits, labels)) - float(F.cross_entropy(avg_logits, labels))) > 1e-3
    assert summary["test_loss"] == pytest.approx(float(F.cross_entropy(avg_logits, labels)), abs=1e-5)

    last = run / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    proc = run_cli("train.py", *args, "trainer.max_epochs=2", f"ckpt_path={last}", check=False)
    assert proc.returncode == 1
    assert "error: cannot resume from" in proc.stderr and "callbacks=ema" in proc.stderr
    assert last.read_bytes() == before
    assert not list((run / ".hydra").glob("resume-*"))  # the refused resume left no record behind
