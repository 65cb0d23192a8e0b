"""Never lose a run: exact resume after SIGKILL, atomic checkpoints, clear errors on bad input."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY, run_cli
from flgc_lightning.errors import CheckpointError
from flgc_lightning.training.checkpoint_io import AtomicCheckpointIO
from flgc_lightning.training.checkpoints import load_checkpoint



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
        proc = run_cli(script, f"ckpt_path={bad}", f"data.root={cifar_subset}",
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
                   check=False, timeout=120)
    assert proc.returncode == 1
    assert "model.groups: checkpoint has 8, this run has 4" in proc.stderr
    assert "model.width_mult: checkpoint has 1.0, this run has 0.5" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert_untouched(before, trained_run)


# The inputs a user tried (issue 11: each was accepted or crashed) and the classic mistakes: one error paragraph
# naming the key, exit 1, no run directory left behind. These go through the real command line (Hydra's own
# override error, a schema error, missing data: the run directory Hydra made is removed); the rest call what
# train.py calls (report_user_errors around training.run.train) in this process, which raises the same errors.
THROUGH_THE_COMMAND_LINE = ("groups=0", "data.root=/does/not/exist", "model.no_such_key=1")


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["groups=0"], "invalid configuration:\n  - groups: input should be greater than or equal to 1, got 0\n"),
        (["model.use_flgc=false", "groups=3"], "features.1.conv.1.0 (32->16)"),
        (["data.root=/does/not/exist", "data.download=false"], "/does/not/exist/cifar-10-batches-py"),
        (["model.no_such_key=1"], "Could not override 'model.no_such_key'"),  # Hydra's own error, with its +key hint
        (["model.use_flgc=maybe"], "invalid configuration:\n  - model.use_flgc must be a boolean, got 'maybe'\n"),
        (["model.width_mult=0"], "invalid configuration:\n  - model.width_mult must be > 0, got 0\n"),
        (["model.width_mult=-1"], "model.width_mult must be > 0, got -1"),
        (["data.limit_train=0"], "data.limit_train must be a positive integer or null, got 0"),
        (["data.num_workers=-1"], "data.num_workers must be a non-negative integer, got -1"),
        (["trainer=gpu"], "trainer.accelerator=gpu, but torch sees no CUDA GPU here; use trainer=cpu"),
        (["optimizer.lr=-1"], "optimizer: Invalid learning rate: -1"),
    ],
)
def test_bad_command_lines_exit_nonzero_with_a_short_message(overrides, expected, tmp_path, capsys, cifar_subset):
    if overrides == ["trainer=gpu"] and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    run_dir = tmp_path / "run"
    if overrides[0] in THROUGH_THE_COMMAND_LINE:
        proc = run_cli("train.py", f"data.root={cifar_subset}", *overrides, f"hydra.run.dir={run_dir}",
                       check=False, timeout=180)
        code, stderr = proc.returncode, proc.stderr
    else:
        from omegaconf import open_dict

        from flgc_lightning.cli import report_user_errors
        from flgc_lightning.config import compose
        from flgc_lightning.training.run import train

        cfg = compose("train", [f"data.root={cifar_subset}", *overrides])
        with open_dict(cfg):
            cfg.run_dir = str(run_dir)  # what Hydra's runtime fills in on the command line
        with pytest.raises(SystemExit) as stopped:
            report_user_errors(lambda: train(cfg))
        code, stderr = stopped.value.code, capsys.readouterr().err
    assert code == 1
    assert expected in stderr, stderr[-2000:]
    assert "Traceback" not in stderr
    if overrides[0] != "model.no_such_key=1":
        lines = stderr.strip().splitlines()
        starts = [i for i, line in enumerate(lines) if line.startswith("error:")]
        assert len(starts) == 1, stderr[-1000:]  # one error paragraph, at the end
        assert all(line.startswith("  ") for line in lines[starts[0] + 1:]), stderr[-1000:]
    assert not run_dir.exists()  # a command that failed before training leaves no run directory


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["groups=two"], "groups: input should be a valid integer, got 'two'"),
        (["model.assignment=balanced", "groups=3"], "balanced FLGC (model.assignment=balanced) needs channel counts"),
        (["model.assignment=sometimes"], None),  # a constructor check, below
        (["+model.no_such_key=1"], "model.no_such_key: not an argument of flgc_lightning.models.MobileNetV2"),
        (["+trainer.max_epoch=3"], "trainer.max_epoch: not an argument of pytorch_lightning.Trainer (did you mean 'max_epochs'?)"),
        (["trainer.max_epochs=many"], "trainer.max_epochs must be an integer or null, got 'many'"),
        (["scheduler.milestones=[10,x]"], "scheduler.milestones must be a list of integers, got [10, 'x']"),
        (["data.val_size=all"], "data.val_size must be an integer or null, got 'all'"),
        (["assign_optim.lr_mult=fast"], "assign_optim.lr_mult: input should be a valid number, got 'fast'"),
        (["+assign_optim.momentum=0.9"], "assign_optim.momentum: not a config key"),
        (["callbacks.step_checkpoint.every_n_train_steps=often"],
         "callbacks.step_checkpoint.every_n_train_steps must be an integer or null, got 'often'"),
        (["+callbacks.extra=3"], "callbacks.extra: expected a config with _target_ or null, got 3"),
        (["num_threads=0"], "num_threads: input should be greater than or equal to 1, got 0"),
        (["compile=yes"], "compile must be a boolean or one of 'default', 'reduce-overhead', 'max-autotune', "
                          "'max-autotune-no-cudagraphs', got 'yes'"),
        (["data=imagefolder", "data.root=x", "data.channels=two"], "data.channels must be an integer or null, got 'two'"),
        (["model.assign_grad=straight"], "model.assign_grad must be one of 'reference', 'ste', 'gumbel', got 'straight'"),
        (["model.dense_weight_grad=maybe"], "model.dense_weight_grad must be a boolean, got 'maybe'"),
        (["assign_optim.warmup_epochs=-1"], "assign_optim.warmup_epochs must be >= 0, got -1"),
        (["assign_optim.warmup_epochs=5", "assign_optim.freeze_epoch=5"],
         "assign_optim.freeze_epoch must be > warmup_epochs (5) or null, got 5"),
        (["assign_optim.tau_end=0"], "assign_optim.tau_end must be > 0, got 0"),
        (["assign_optim.tau_epochs=0"], "assign_optim.tau_epochs must be >= 1 or null, got 0"),
        (["assign_optim.freeze_epoch=later"], "assign_optim.freeze_epoch: input should be a valid integer, got 'later'"),
        (["assign_optim.regroup_epochs=[3,-1]"], "assign_optim.regroup_epochs must be epochs >= 0, got [3, -1]"),
        (["assign_optim.freeze_epoch=2", "assign_optim.regroup_epochs=[3]"],
         "assign_optim.regroup_epochs must be <= freeze_epoch (2)"),
    ],
)
def test_every_key_is_checked_against_its_schema(overrides, expected):
    """All keys of the composed config, by the signatures of the classes they configure (and the top-level schema)."""
    from flgc_lightning.config import compose
    from flgc_lightning.errors import ConfigError
    from flgc_lightning.training.validation import validate_config

    from omegaconf import OmegaConf, open_dict

    cfg = compose("train", overrides)
    with open_dict(cfg):
        cfg.run_dir = "/tmp/unused"
    if expected is None:
        validate_config(cfg)  # types are fine: the model's own constructor rejects the value
        from flgc_lightning.training.schema import instantiate_checked
        model = OmegaConf.to_container(cfg.model, resolve=True) | {"num_classes": 10, "in_channels": 3}
        with pytest.raises(ConfigError, match="model.assignment must be one of learned, frozen, balanced, got 'sometimes'"):
            instantiate_checked(model, "model")
        return
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert expected in str(err.value)


def test_the_default_configs_and_every_experiment_pass_the_schema():
    from omegaconf import open_dict

    from flgc_lightning.config import CONFIG_DIR, compose
    from flgc_lightning.training.validation import validate_config

    choices = [[f"experiment={p.stem}"] for p in sorted((CONFIG_DIR / "experiment").glob("*.yaml"))]
    for group in ("data", "trainer", "scheduler", "logger", "callbacks", "optimizer", "model"):
        choices += [[f"{group}={p.stem}", *(["data.root=x"] if p.stem == "imagefolder" else [])]
                    for p in sorted((CONFIG_DIR / group).glob("*.yaml"))]
    assert len(choices) > 20
    for overrides in choices:
        cfg = compose("train", overrides)
        with open_dict(cfg):
            cfg.run_dir = "/tmp/unused"
        validate_config(cfg)


def test_resume_setting_changes_are_listed():
    from flgc_lightning.training.validation import resume_setting_changes

    saved = {"seed": 1, "data": {"root": "a", "batch_size": 128}, "optimizer": {"lr": 0.1}, "trainer": {"max_epochs": 1}}
    now = {"seed": 1, "data": {"root": "b", "batch_size": 128}, "optimizer": {"lr": 0.01}, "trainer": {"max_epochs": 9}}
    assert resume_setting_changes(now, saved) == ["data.root: checkpoint 'a', now 'b'", "optimizer.lr: checkpoint 0.1, now 0.01"]
    assert resume_setting_changes(saved, saved) == []


def test_flgc_with_more_groups_than_channels_warns_but_is_allowed():
    import logging

    from omegaconf import open_dict

    from flgc_lightning.config import compose
    from flgc_lightning.training.validation import validate_config

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("flgc_lightning.training.validation").addHandler(handler)
    try:
        cfg = compose("train", ["groups=20"])
        with open_dict(cfg):
            cfg.run_dir = "/tmp/unused"  # composed without Hydra's runtime, which the command line fills in
        validate_config(cfg)
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
    step = int(message.split("at global step ")[1].split(";")[0])
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == step  # the checkpoint before the bad step is kept
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values() if t.is_floating_point())


def test_metrics_csv_survives_a_kill_while_a_new_metric_name_rewrites_it(tmp_path, monkeypatch):
    """Lightning's CSV writer rewrites metrics.csv in place when a metric name first appears; a run killed inside
    that rewrite lost every row so far (a SIGKILL right after epoch 0's checkpoint, in tests/test_resume.py). The
    logger train.py uses (conf/logger) rewrites into a temporary file that replaces metrics.csv in one step."""
    import csv

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    logger = instantiate(OmegaConf.load(REPO / "conf" / "logger" / "csv.yaml").csv, save_dir=str(tmp_path))
    logger.log_metrics({"val/acc": 0.5, "epoch": 0}, step=3)
    logger.save()
    metrics = Path(logger.log_dir) / "metrics.csv"
    before = metrics.read_text()
    assert "val/acc" in before

    class Killed(BaseException):
        pass

    def killed(self, rows):  # the process dies while the old rows are written again under the new header
        raise Killed

    monkeypatch.setattr(csv.DictWriter, "writerows", killed)
    logger.log_metrics({"train/acc_epoch": 0.25, "epoch": 0}, step=4)
    with pytest.raises(Killed):
        logger.save()
    assert metrics.read_text() == before
    assert not list(Path(logger.log_dir).glob(".metrics-*"))  # no temporary file left behind
