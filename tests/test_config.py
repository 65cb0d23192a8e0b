"""Every documented command line composes through Hydra's compose API to what it promises."""
from __future__ import annotations

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from flgc_lightning.config import compose
from flgc_lightning.layers import Flgc2d
from flgc_lightning.utils.complexity import count_parameters


def build_net(cfg):
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg.update(num_classes=10, in_channels=3)
    return instantiate(model_cfg)


def test_defaults_are_the_reference_recipe():
    cfg = compose("train")
    assert cfg.groups == 8 and cfg.model.groups == 8 and cfg.model.use_flgc is True
    assert cfg.data.dataset == "cifar10" and cfg.data.batch_size == 128 and cfg.data.root == "data"
    assert cfg.optimizer._target_ == "torch.optim.SGD"
    assert (cfg.optimizer.lr, cfg.optimizer.momentum, cfg.optimizer.weight_decay) == (0.1, 0.9, 4e-5)
    assert cfg.scheduler._target_ == "torch.optim.lr_scheduler.MultiStepLR"
    assert list(cfg.scheduler.milestones) == [150, 250, 350] and cfg.scheduler.gamma == 0.1
    assert cfg.trainer.max_epochs == 400 and cfg.trainer.check_val_every_n_epoch == 1
    ckpt = cfg.callbacks.model_checkpoint
    assert ckpt.save_last is True and ckpt.monitor == "val/acc" and ckpt.mode == "max" and ckpt.save_top_k == 1
    assert isinstance(cfg.seed, int) and cfg.ckpt_path is None


@pytest.mark.parametrize(
    "overrides, flgc_layers, params",
    [
        (["model.use_flgc=true", "groups=8"], 17, 2_364_954),
        (["model.use_flgc=false", "groups=8"], 0, 1_453_034),
        (["groups=1"], 0, 2_295_834),
        (["model.use_flgc=true", "groups=3"], 17, 2_295_834 + 8640 * 3),
        (["groups=4", "model.group_expand=true", "model.group_shortcut=true"], 37, None),
    ],
)
def test_model_command_lines(overrides, flgc_layers, params):
    cfg = compose("train", overrides)
    net = build_net(cfg)
    assert sum(isinstance(m, Flgc2d) for m in net.modules()) == flgc_layers
    if params is not None:
        assert count_parameters(net) == params


def test_trainer_groups():
    assert compose("train", ["trainer=cpu"]).trainer.accelerator == "cpu"
    gpu = compose("train", ["trainer=gpu"]).trainer
    assert gpu.accelerator == "gpu" and gpu.precision == "bf16-mixed"
    ddp = compose("train", ["trainer=ddp", "trainer.devices=4"]).trainer
    assert ddp.strategy == "ddp" and ddp.devices == 4 and ddp.sync_batchnorm is True


def test_cosine_schedule_follows_epochs():
    cfg = compose("train", ["scheduler=cosine", "trainer.max_epochs=30"])
    assert cfg.scheduler._target_.endswith("CosineAnnealingLR") and cfg.scheduler.T_max == 30


def test_all_training_objects_instantiate():
    cfg = compose("train", ["data.root=/nonexistent", "trainer.max_epochs=2"], return_hydra_config=True)
    OmegaConf.update(cfg, "run_dir", "/tmp/flgc-compose-test", force_add=True)
    dm = instantiate(cfg.data)
    assert dm.batch_size == 128 and dm.root.as_posix() == "/nonexistent"
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c and "_target_" in c]
    assert {type(c).__name__ for c in callbacks} >= {"ModelCheckpoint", "LearningRateMonitor"}
    loggers = [instantiate(c) for c in cfg.logger.values() if c and "_target_" in c]
    assert {type(c).__name__ for c in loggers} == {"AtomicCSVLogger", "TensorBoardLogger"}


def test_resume_and_test_command_lines(tmp_path):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    ckpt = run / "checkpoints" / "last.ckpt"
    cfg = compose("train", [f"ckpt_path={ckpt}"], return_hydra_config=True)
    assert cfg.ckpt_path == str(ckpt)
    assert cfg.hydra.run.dir == str(run)  # resumes in the checkpoint's own run directory
    assert cfg.hydra.output_subdir.startswith(".hydra/resume-")
    fresh = compose("train", [], return_hydra_config=True)
    assert fresh.hydra.run.dir.startswith("outputs/") and fresh.hydra.output_subdir == ".hydra"
    test_cfg = compose("test", [f"ckpt_path={ckpt}", "data.root=elsewhere"])
    assert test_cfg.ckpt_path == str(ckpt) and test_cfg.data.root == "elsewhere"


def test_sweep_directory_layout():
    cfg = compose("train", [], return_hydra_config=True)
    assert cfg.hydra.sweep.dir.startswith("multirun/")
    assert OmegaConf.to_container(cfg.hydra.sweep)["subdir"] == "${hydra.job.num}"
