"""Cost of the AssignmentTracker callback: epoch time with and without it, interleaved in one run.

    python benchmarks/assignment_callback.py --data-root ../shared/data/cifar10-subset

One Lightning fit of MobileNetV2-FLGC (G=8, 17 FLGC layers) on real CIFAR-10 images; the
tracker runs on odd epochs only, so both kinds of epoch share the same process, data and
machine load. Epoch time = start of one training epoch to the start of the next (includes the
epoch-end logging the tracker triggers). The tracker's own hook is also timed directly, which
is far less noisy than a difference of two epoch times on a shared machine.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's flgc_lightning

import pytorch_lightning as pl  # noqa: E402
from pytorch_lightning.callbacks import Callback  # noqa: E402
from pytorch_lightning.loggers import CSVLogger  # noqa: E402

from flgc_lightning.callbacks import AssignmentTracker  # noqa: E402
from flgc_lightning.data import CifarDataModule  # noqa: E402
from flgc_lightning.training.module import ImageClassifier  # noqa: E402

FULL_CIFAR10_STEPS = 391  # 50,000 images / batch 128


class AlternateTracker(Callback):
    """Runs the tracker's epoch-end hook on odd epochs only and times epochs and the hook."""

    def __init__(self, tracker: AssignmentTracker):
        self.tracker = tracker
        self.starts: list[float] = []
        self.hook_seconds: list[float] = []

    def on_train_start(self, trainer, pl_module):
        self.tracker.on_train_start(trainer, pl_module)

    def on_train_epoch_start(self, trainer, pl_module):
        self.starts.append(time.perf_counter())

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch % 2 == 1:
            t0 = time.perf_counter()
            self.tracker.on_train_epoch_end(trainer, pl_module)
            self.hook_seconds.append(time.perf_counter() - t0)

    def on_train_end(self, trainer, pl_module):
        self.starts.append(time.perf_counter())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared/data/cifar10-subset"))
    parser.add_argument("--epochs", type=int, default=8, help="even; half with the tracker")
    parser.add_argument("--limit-train", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--groups", type=int, default=8)
    args = parser.parse_args()

    pl.seed_everything(0)
    data = CifarDataModule(root=args.data_root, batch_size=args.batch_size, num_workers=0,
                           limit_train=args.limit_train, limit_test=args.batch_size)
    module = ImageClassifier(
        model={"_target_": "flgc_lightning.models.MobileNetV2", "num_classes": 10, "groups": args.groups,
               "use_flgc": True},
        optimizer={"_target_": "torch.optim.SGD", "lr": 0.1, "momentum": 0.9, "weight_decay": 4e-5},
    )
    with tempfile.TemporaryDirectory() as run_dir:
        timer = AlternateTracker(AssignmentTracker(run_dir=run_dir))
        trainer = pl.Trainer(default_root_dir=run_dir, max_epochs=args.epochs, accelerator="cpu", devices=1,
                             logger=CSVLogger(run_dir, name="csv"), callbacks=[timer], limit_val_batches=0,
                             num_sanity_val_steps=0, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False)
        trainer.fit(module, datamodule=data)
        records = sum(1 for _ in open(Path(run_dir) / "assignments.jsonl"))

    epochs = [b - a for a, b in zip(timer.starts, timer.starts[1:])]
    steps = trainer.num_training_batches
    print(f"{len(timer.tracker._layers)} FLGC layers, {steps} steps of {args.batch_size} images per epoch, "
          f"{records} records written")
    print("epoch  tracker  seconds")
    for i, seconds in enumerate(epochs):
        print(f"{i:5d}  {'yes' if i % 2 else 'no':>7}  {seconds:7.2f}")
    # Epoch 0 includes one-off warm-up; compare the later epochs only.
    with_ = statistics.median(epochs[1::2])
    without = statistics.median(epochs[2::2])
    hook = statistics.median(timer.hook_seconds)
    print(f"median epoch time: with tracker {with_:.3f} s, without {without:.3f} s "
          f"-> ratio {with_ / without:.4f} (noisy: the machine is shared)")
    print(f"tracker hook: median {hook * 1e3:.2f} ms per epoch = {hook / without:.3%} of this epoch; "
          f"{hook / (without / steps * FULL_CIFAR10_STEPS):.4%} of a full CIFAR-10 epoch ({FULL_CIFAR10_STEPS} steps)")
    print(f"goal < 2 %: {'met' if max(with_ / without - 1, hook / without) < 0.02 else 'NOT met'}")


if __name__ == "__main__":
    main()
