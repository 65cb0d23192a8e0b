"""The documented command lines, run as a user would, on tiny slices of real CIFAR-10."""
from __future__ import annotations

import csv
import json

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

    tested = run_cli("test.py", f"ckpt_path={last}", data, "data.limit_test=32",
                     "trainer.accelerator=cpu", f"hydra.run.dir={tmp_path / 'test'}")
    assert "test acc" in tested.stdout and "%" in tested.stdout
    assert "params     : 2,364,954" in tested.stdout
    # test.py's accuracy equals an independent evaluation of the same checkpoint: the network rebuilt from the
    # checkpoint's saved model config, the 32 test images normalised by hand, in eval mode.
    reported = json.loads((tmp_path / "test" / "test_results.json").read_text())["test_acc"]
    assert f"{100 * reported:.2f} %" in tested.stdout
    assert reported == pytest.approx(independent_accuracy(last, cifar_subset, 32), abs=1e-6)


def network_of(checkpoint_path):
    """The network rebuilt from a checkpoint's saved model config and weights, in eval mode."""
    from flgc_lightning.models import MobileNetV2

    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    model_cfg = {k: v for k, v in checkpoint["hyper_parameters"]["model"].items() if k != "_target_"}
    net = MobileNetV2(**model_cfg)
    net.load_state_dict({k[len("net."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")})
    return net.eval()


def accuracy_by_hand(net, pixels, labels) -> float:
    """uint8 N x 3 x 32 x 32 images normalised by hand (REFERENCE.md section 3), eval-mode predictions."""
    import numpy as np

    mean = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32)[:, None, None]
    std = np.array([0.2023, 0.1994, 0.2010], dtype=np.float32)[:, None, None]
    images = torch.from_numpy((np.asarray(pixels, dtype=np.float32) / 255.0 - mean) / std)
    with torch.no_grad():
        predictions = net.eval()(images).argmax(1)
    return float((predictions == torch.as_tensor(labels)).float().mean())


def cifar_test_images(root, count: int):
    import pickle

    import numpy as np

    with open(root / "cifar-10-batches-py" / "test_batch", "rb") as fh:
        batch = pickle.load(fh, encoding="latin1")
    return np.asarray(batch["data"][:count]).reshape(count, 3, 32, 32), batch["labels"][:count]


def independent_accuracy(checkpoint_path, root, count: int) -> float:
    return accuracy_by_hand(network_of(checkpoint_path), *cifar_test_images(root, count))


def test_test_after_fit_tests_the_checkpoint_best_on_held_out_data(tmp_path, cifar_subset):
    """The study's headline number: with data.val_size and test_after_fit, summary.json's test_acc is the test
    accuracy of the checkpoint best on the held-out validation images. Every epoch's weights (a probe) are
    evaluated here by hand on the held-out images (the split from the data module: tests/test_data.py checks it)
    and on the test images.

    Which epoch is best must tell the selection rules apart, and real training's pattern over 4 tiny epochs
    changes with the CPU and thread count (rounding picks other ties). So a probe sets, before each validation,
    a classifier that predicts one class everywhere: each epoch's accuracy is that class's share of the images.
    The classes are chosen from the data so that the best epoch on validation is neither the last nor the best on
    test, and a later epoch ties it; the checkpoint's file name names the epoch, so a rule that took the last
    checkpoint, the best on test, the last of tied epochs or one selected on the test split picks another file."""
    from collections import Counter

    from flgc_lightning.data import CifarDataModule
    from flgc_lightning.models import MobileNetV2

    data = CifarDataModule(root=str(cifar_subset), download=False, val_size=128, limit_train=128, limit_test=128)
    data.setup()
    test_images, test_labels = cifar_test_images(cifar_subset, 128)
    on_val, on_test = Counter(int(y) for y in data.val_set.labels), Counter(int(y) for y in test_labels)
    # epochs predict a, b, c, b: b is best on validation (first at epoch 1, tied at 3), a is better on test
    classes = next(((a, b, c) for a in range(10) for b in range(10) for c in range(10) if len({a, b, c}) == 3
                    and on_val[b] > max(on_val[a], on_val[c]) and on_test[a] > on_test[b]), None)
    assert classes is not None, (on_val, on_test)  # the subset's class shares allow such a pattern
    a, b, c = classes
    run, weights = tmp_path / "run", tmp_path / "weights"
    run_cli("train.py", f"data.root={cifar_subset}", *TINY, "data.limit_train=128", "data.limit_test=128",
            "data.val_size=128", "test_after_fit=true", "model.width_mult=0.25", "trainer.max_epochs=4",
            "trainer.deterministic=true", "seed=2", "+callbacks.weights._target_=tests.probes.EpochWeights",
            f"+callbacks.weights.folder={weights}", "+callbacks.script._target_=tests.probes.ScriptedPredictions",
            f"+callbacks.script.classes=[{a},{b},{c},{b}]", f"hydra.run.dir={run}")
    summary = json.loads((run / "summary.json").read_text())
    net = MobileNetV2(groups=8, use_flgc=True, width_mult=0.25)
    val, test = [], []
    for epoch in range(4):
        net.load_state_dict(torch.load(weights / f"epoch{epoch}.pt", weights_only=True))
        val.append(accuracy_by_hand(net, data.val_set.images.numpy(), data.val_set.labels))
        test.append(accuracy_by_hand(net, test_images, test_labels))
    assert val == pytest.approx([on_val[k] / 128 for k in (a, b, c, b)], abs=1e-6)  # the probe did its part
    # the run validated on the held-out images: its logged accuracies are these, not the test split's
    assert [h["val_acc"] for h in summary["history"]] == pytest.approx(val, abs=1e-6)
    best = val.index(max(val))  # the first best (a later tie does not replace it)
    assert best == 1 and val[3] == val[1] and test.index(max(test)) != best, (val, test)
    assert summary["test_checkpoint"] == str(run / "checkpoints" / f"best-epoch{best:03d}.ckpt")
    assert summary["best_epoch"] == best and summary["test_acc"] == pytest.approx(test[best], abs=1e-6)
    assert summary["test_acc"] == pytest.approx(independent_accuracy(summary["test_checkpoint"], cifar_subset, 128),
                                                abs=1e-6)


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
