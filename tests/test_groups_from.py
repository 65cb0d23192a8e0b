"""Retraining controls: a trained run's groups in a fresh network (model.groups_from), shuffled with sizes kept."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import TINY, run_cli
from flgc_lightning.assignments.checkpoints import checkpoint_groups
from flgc_lightning.assignments.transfer import transfer_groups
from flgc_lightning.errors import ConfigError
from flgc_lightning.layers.flgc import Flgc2d
from flgc_lightning.models import MobileNetV2
from flgc_lightning.training.checkpoints import load_checkpoint

SOURCE = ("model.width_mult=0.25", "groups=4", "trainer.max_epochs=1", "model.assign_grad=ste",
          "model.dense_weight_grad=true", "assign_optim.lr_mult=50")


@pytest.fixture(scope="module")
def source_run(cifar_subset, tmp_path_factory):
    run = tmp_path_factory.mktemp("source")
    run_cli("train.py", f"data.root={cifar_subset}", *TINY, *SOURCE, f"hydra.run.dir={run}")
    return run / "checkpoints" / "last.ckpt"


def layers(net):
    return [(n, m) for n, m in net.named_modules() if isinstance(m, Flgc2d)]


def test_groups_from_with_and_without_shuffle_keeps_sizes(source_run):
    source = {l["name"]: l for l in checkpoint_groups(load_checkpoint(source_run))}
    kept, shuffled = (MobileNetV2(groups=4, use_flgc=True, width_mult=0.25, groups_from=str(source_run),
                                  groups_shuffle=s) for s in (False, True))
    transfer_groups(kept, source_run)
    transfer_groups(shuffled, source_run, shuffle=True, seed=3)
    differ = 0
    for (name, a), (_, b) in zip(layers(kept), layers(shuffled)):
        assert not a.learn_assignments and not b.learn_assignments  # frozen
        src = source[name]
        assert a.input_groups().tolist() == src["inputs"].tolist()
        assert a.filter_groups().tolist() == src["filters"].tolist()
        for side, ids in (("inputs", b.input_groups()), ("filters", b.filter_groups())):
            assert np.bincount(ids, minlength=4).tolist() == np.bincount(src[side], minlength=4).tolist()
            differ += int((ids.numpy() != src[side]).sum())
    assert differ > 0.5 * sum(m.in_channels + m.out_channels for _, m in layers(kept))  # really reshuffled
    again = MobileNetV2(groups=4, use_flgc=True, width_mult=0.25, groups_from=str(source_run), groups_shuffle=True)
    transfer_groups(again, source_run, shuffle=True, seed=3)
    assert all(torch.equal(x.in_assign, y.in_assign) for (_, x), (_, y) in zip(layers(again), layers(shuffled)))


def test_groups_from_refuses_a_network_that_does_not_fit(source_run):
    with pytest.raises(ConfigError, match="don't fit this network"):
        transfer_groups(MobileNetV2(groups=8, use_flgc=True, width_mult=0.25, groups_from="x"), source_run)
    with pytest.raises(ValueError, match="groups_shuffle=true needs groups_from"):
        MobileNetV2(groups=4, use_flgc=True, groups_shuffle=True)


@pytest.mark.slow
def test_retrain_run_trains_the_source_groups_frozen(source_run, cifar_subset, tmp_path):
    """The documented command: a fresh run with the learned groups, frozen through training, shuffled per seed."""
    run = tmp_path / "retrain"
    run_cli("train.py", f"data.root={cifar_subset}", *TINY, "model.width_mult=0.25", "groups=4",
            "trainer.max_epochs=1", f"model.groups_from={source_run}", "model.groups_shuffle=true",
            f"hydra.run.dir={run}")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["config"]["conv_type"] == "FLGC-retrain-shuffled" and summary["channels_ever_moved"] == 0
    source = {l["name"]: l for l in checkpoint_groups(load_checkpoint(source_run))}
    trained = {l["name"]: l for l in checkpoint_groups(load_checkpoint(run / "checkpoints" / "last.ckpt"))}
    for name, layer in trained.items():
        for side in ("inputs", "filters"):
            assert np.bincount(layer[side], minlength=4).tolist() == np.bincount(source[name][side], minlength=4).tolist()
