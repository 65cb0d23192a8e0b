"""Test-only Lightning callbacks, added to real command lines with ``+callbacks.NAME._target_=tests.probes.X``.

They observe a run without changing what it computes (no RNG use, no state in checkpoints), except
:class:`ScriptedPredictions`, which sets what each epoch's validation sees on purpose.
"""
from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback


def _append(path: str, record: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


class StepRecorder(Callback):
    """One JSON line per event: each finished training step (with its global step), validation start/end.

    ``pause_in_validation`` seconds are slept after each validation batch, so a test can stop the run
    while validation is under way.
    """

    def __init__(self, path: str, pause_in_validation: float = 0.0) -> None:
        self.path, self.pause = path, pause_in_validation

    def _record(self, trainer: pl.Trainer, event: str) -> None:
        _append(self.path, {"pid": os.getpid(), "rank": trainer.global_rank, "event": event,
                            "epoch": trainer.current_epoch, "step": trainer.global_step})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._record(trainer, "step")

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._record(trainer, "validation_start")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking and self.pause:
            time.sleep(self.pause)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._record(trainer, "validation_end")


def tensor_digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


class RankProbe(Callback):
    """Per rank: a digest of every training sample it saw, of its weights after each step, and every file
    it opened for writing under the run directory (``<folder>/rank<N>.json``)."""

    def __init__(self, folder: str, run_dir: str) -> None:
        self.folder, self.run_dir = Path(folder), str(Path(run_dir).resolve())
        self.samples: list[str] = []
        self.weights: list[str] = []
        self.writes: list[str] = []

    def setup(self, trainer, pl_module, stage) -> None:
        original_open, probe = builtins.open, self

        def watching_open(file, mode="r", *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and any(m in mode for m in "wax+"):
                path = Path(file).resolve()
                if path.is_relative_to(probe.run_dir):
                    probe.writes.append(str(path))
            return original_open(file, mode, *args, **kwargs)

        builtins.open = watching_open
        io.open = watching_open

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        images, _ = batch
        self.samples += [tensor_digest(x) for x in images]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        flat = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        self.weights.append(tensor_digest(flat))

    def on_train_end(self, trainer, pl_module) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"rank{trainer.global_rank}-{os.getpid()}.json").write_text(json.dumps(
            {"rank": trainer.global_rank, "samples": self.samples, "weights": self.weights, "writes": self.writes}))


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class EpochWeights(Callback):
    """The network's weights as each epoch's validation saw them: ``folder/epoch<N>.pt`` (the sanity check skipped)."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        torch.save(pl_module.net.state_dict(), self.folder / f"epoch{trainer.current_epoch}.pt")


class HoldAtStep(Callback):
    """Holds the run still once ``checkpoint`` (a ``last.ckpt`` path) holds step ``step``, so a test can kill it
    there: at the start of the next training batch, after that step's checkpoint was written, it writes
    ``marker`` and sleeps (at most ``limit`` seconds, then goes on). Only the run whose checkpoint folder is
    ``checkpoint``'s holds (the other jobs of a sweep run through). Without it a test polling the checkpoint
    can miss a one-step window on a busy machine and the run ends before it is stopped."""

    def __init__(self, checkpoint: str, step: int, marker: str, limit: float = 600.0) -> None:
        self.checkpoint, self.step, self.marker, self.limit = Path(checkpoint), step, Path(marker), limit

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        folders = {Path(cb.dirpath).resolve() for cb in trainer.checkpoint_callbacks if cb.dirpath}
        if trainer.global_step != self.step or self.checkpoint.parent.resolve() not in folders:
            return
        if torch.load(self.checkpoint, weights_only=True)["global_step"] != self.step:
            raise AssertionError(f"{self.checkpoint} does not hold step {self.step}")
        self.marker.write_text(str(os.getpid()))
        deadline = time.time() + self.limit
        while time.time() < deadline:
            time.sleep(0.05)


def hold(checkpoint: Path, step: int, marker: Path) -> tuple[str, ...]:
    """Overrides adding :class:`HoldAtStep`."""
    return ("+callbacks.hold._target_=tests.probes.HoldAtStep", f"+callbacks.hold.checkpoint={checkpoint}",
            f"+callbacks.hold.step={step}", f"+callbacks.hold.marker={marker}")


class ScriptedPredictions(Callback):
    """Before each epoch's validation the classifier is set to predict class ``classes[epoch]`` for every image
    (weights zero, that class's bias one), so each epoch's accuracy is that class's share of the images, on any
    CPU. The run goes on from there: the checkpoints hold these weights. Lets a test choose a validation pattern
    that tells checkpoint-selection rules apart, where real training's pattern changes with the CPU's rounding."""

    def __init__(self, classes: list[int]) -> None:
        self.classes = list(classes)

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        classifier = pl_module.net.classifier
        with torch.no_grad():
            classifier.weight.zero_()
            classifier.bias.zero_()
            classifier.bias[self.classes[trainer.current_epoch]] = 1.0
