"""Files can't run code (issue 20).

Checkpoints: a real train.py checkpoint with planted configs (``os.makedirs`` as the network, optimizer,
scheduler or data module, a ``_target_`` nested in an argument, Hydra's ``_args_``, an interpolation that
decodes to a ``_target_``) is refused with a clear message by every program that reads checkpoints, and the
planted directory is never made. Kernel tables: tables the C kernel would index out of bounds are refused on
every path that hands them to C (direct op calls, a ``.pt2`` program, ONNX Runtime), and, where a C compiler
with AddressSanitizer exists, a sanitized build shows that the checked path never reads or writes out of bounds.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY, run_cli
from flgc_lightning.errors import CheckpointError

# --------------------------------------------------------------------------------------------------------------
# Checkpoints can't choose code
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cifar_subset) -> Path:
    """A real checkpoint of ``python train.py`` (one tiny epoch on the CIFAR subset)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    run_cli("train.py", f"data.root={cifar_subset}", *TINY, "trainer.max_epochs=1", "model.width_mult=0.25",
            "groups=2", f"hydra.run.dir={run}")
    return run / "checkpoints" / "last.ckpt"


def makedirs(made: Path) -> dict:
    """A config that, built by Hydra, creates the directory ``made``: the side effect the checks must prevent."""
    return {"_target_": "os.makedirs", "name": str(made)}


def _model_and_run_config(c, made):
    c["hyper_parameters"]["model"] = makedirs(made)
    c["flgc_config"]["model"] = makedirs(made)


def _optimizer(c, made):
    c["hyper_parameters"]["optimizer"] = makedirs(made)
    c["flgc_config"]["optimizer"] = makedirs(made)


def _scheduler(c, made):
    c["hyper_parameters"]["scheduler"] = makedirs(made)


def _data(c, made):
    c["flgc_config"]["data"] = makedirs(made)


def _nested(c, made):
    c["hyper_parameters"]["model"]["width_mult"] = makedirs(made)


def _nested_in_list(c, made):
    c["hyper_parameters"]["scheduler"]["milestones"] = [150, makedirs(made)]


def _args(c, made):
    c["hyper_parameters"]["model"]["_args_"] = [makedirs(made)]


def _interpolation(c, made):
    c["hyper_parameters"]["model"]["width_mult"] = "${oc.decode:'{_target_: os.makedirs, name: " + str(made) + "}'}"


PLANTS = {  # name: (what the file says, what the refusal must name)
    "model": (_model_and_run_config, r"hyper_parameters\.model\._target_: 'os\.makedirs' is not one of the classes "
                                     r"a file may build"),
    "optimizer": (_optimizer, r"hyper_parameters\.optimizer\._target_: 'os\.makedirs'"),
    "scheduler": (_scheduler, r"hyper_parameters\.scheduler\._target_: 'os\.makedirs'"),
    "data": (_data, r"flgc_config\.data\._target_: 'os\.makedirs'"),
    "nested": (_nested, r"hyper_parameters\.model\.width_mult: a nested _target_"),
    "nested-in-list": (_nested_in_list, r"hyper_parameters\.scheduler\.milestones\[1\]: a nested _target_"),
    "args": (_args, r"hyper_parameters\.model\._args_: Hydra key"),
    "interpolation": (_interpolation, r"hyper_parameters\.model\.width_mult: .*interpolation"),
}


def plant(trained: Path, folder: Path, name: str) -> tuple[Path, Path, str]:
    """A copy of the trained checkpoint with plant ``name``: (file, the directory it would make, message regex)."""
    edit, message = PLANTS[name]
    checkpoint = torch.load(trained, map_location="cpu", weights_only=True)
    made = folder / f"made-by-{name}"
    edit(checkpoint, made)
    path = folder / "checkpoints" / "planted.ckpt"
    path.parent.mkdir(parents=True)
    torch.save(checkpoint, path)
    return path, made, message


def test_real_checkpoints_still_load_everywhere(trained, tmp_path):
    """The allow-list lets train.py's own checkpoints through (every saved config passes its schema check); a
    config the user composes is trusted (any optimizer class), the same config from a file is not."""
    from flgc_lightning.deploy.checkpoint import load_trained_network
    from flgc_lightning.training.checkpoints import load_checkpoint
    from flgc_lightning.training.file_config import TRUSTED
    from flgc_lightning.training.module import ImageClassifier

    checkpoint = load_checkpoint(trained)
    module = ImageClassifier.load_from_checkpoint(trained)
    net, input_size = load_trained_network(trained)
    assert input_size == (3, 32, 32) and type(net) is type(module.net)
    assert module.configure_optimizers()["optimizer"].__class__.__name__ == "SGD"
    hparams = {**checkpoint["hyper_parameters"], "optimizer": {"_target_": "torch.optim.RMSprop", "lr": 0.1}}
    assert type(ImageClassifier(**hparams, config_origin=TRUSTED).configure_optimizers()["optimizer"]).__name__ == "RMSprop"
    with pytest.raises(CheckpointError, match=r"'torch\.optim\.RMSprop' is not one of the classes"):
        ImageClassifier(**hparams)


@pytest.mark.parametrize("name", PLANTS)
def test_every_reader_refuses_a_planted_checkpoint(name, trained, tmp_path, capsys):
    """In-process, every program that reads a checkpoint: the test and deploy steps, Lightning's
    ``load_from_checkpoint``, resume, the assignment tools; each names the file and what it refused."""
    from flgc_lightning.assignments.report import main as assignments
    from flgc_lightning.cli import report_user_errors
    from flgc_lightning.config import compose
    from flgc_lightning.deploy.checkpoint import load_trained_network
    from flgc_lightning.training.checkpoints import load_checkpoint
    from flgc_lightning.training.evaluate import evaluate
    from flgc_lightning.training.module import ImageClassifier
    from flgc_lightning.training.run import train

    path, made, message = plant(trained, tmp_path, name)
    readers = {
        "load_checkpoint": lambda: load_checkpoint(path),
        "test.py": lambda: evaluate(compose("test", [f"ckpt_path={path}", f"run_dir={tmp_path / 'test'}"]), []),
        "deploy": lambda: load_trained_network(path),
        "load_from_checkpoint": lambda: ImageClassifier.load_from_checkpoint(path),
        "resume": lambda: train(compose("train", [f"ckpt_path={path}", f"run_dir={tmp_path / 'run'}",
                                                  "trainer.accelerator=cpu"])),
        "assignments": lambda: assignments(["--from-checkpoints", str(path.parent)]),
    }
    for reader, read in readers.items():
        with pytest.raises(CheckpointError, match=message) as refused:
            read()
        assert f"'{path}' refused" in str(refused.value), reader
    if name == "model":  # a reader of the whole file names every place
        with pytest.raises(CheckpointError, match=r"(?s)hyper_parameters\.model\._target_.*flgc_config\.model\._target_"):
            load_checkpoint(path)
    with pytest.raises(SystemExit) as stopped:  # as the assignments command line reports it
        report_user_errors(lambda: assignments(["--from-checkpoints", str(path.parent)]))
    assert stopped.value.code == 1
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")] == [
        f"error: checkpoint '{path}' refused (a file cannot choose the code that runs):"]
    assert not made.exists() and not (tmp_path / "test").exists() and not (tmp_path / "run").exists()


def _one_error_line(proc: subprocess.CompletedProcess, path: Path) -> None:
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: checkpoint '{path}' refused (a file cannot choose the code that runs):"], proc.stderr
    assert "'os.makedirs' is not one of the classes a file may build" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_command_lines_refuse_a_planted_checkpoint(trained, tmp_path):
    """The real commands (test.py, the deploy step, a resume) on a checkpoint whose network is ``os.makedirs``:
    exit 1 with one ``error:`` line, the directory never made, nothing written."""
    path, made, _ = plant(trained, tmp_path, "model")
    _one_error_line(run_cli("test.py", f"ckpt_path={path}", f"hydra.run.dir={tmp_path / 'test'}", check=False), path)
    _one_error_line(run_cli("-m", "flgc_lightning.deploy", str(path), "--out", str(tmp_path / "deployed"),
                            check=False), path)
    _one_error_line(run_cli("train.py", f"ckpt_path={path}", "trainer.accelerator=cpu",
                            f"hydra.run.dir={tmp_path / 'resumed'}", check=False), path)
    assert not made.exists()
    assert not any((tmp_path / d).exists() for d in ("test", "deployed", "resumed"))
