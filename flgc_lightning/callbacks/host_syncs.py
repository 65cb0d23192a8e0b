"""Count the host-device synchronisations of whole training steps, as a callback any run can add.

A synchronisation makes the host wait for the GPU, so the next step's kernels are not queued while
the current ones run. The window of one step runs from the end of the previous training batch to the
end of this one: data planning, batch transfer, augmentation, every hook, forward, backward, optimizer
step and logging are inside it. Validation, checkpointing and epoch ends are outside.

On CUDA the count comes from CUDA itself (``torch.cuda.set_sync_debug_mode("warn")`` warns at every
synchronising call, ``.item()``, ``.cpu()``, ``.tolist()``, blocking copies and data-dependent shapes
included). On the CPU nothing waits, so it counts the ops that would synchronise on a GPU (reading a
value, data-dependent output sizes) as they are dispatched, and tensors made from host data inside the step
(``lift_fresh``: on a GPU a blocking host-to-device copy, e.g. a Python number passed where a tensor is
expected); host-side reads such as ``.tolist()`` are not ops there and are seen on CUDA only.

    python train.py +callbacks.host_syncs._target_=flgc_lightning.callbacks.HostSyncCounter \
        +callbacks.host_syncs.path='${run_dir}/host_syncs.json'
"""
from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path
from typing import Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that make the host wait for a CUDA device: reading a value or an output whose size depends on the data;
# lift_fresh is a tensor made from host data (torch.tensor / as_tensor of Python values), which on a GPU is a
# blocking copy from pageable host memory.
SYNCING_OPS = ("_local_scalar_dense", "nonzero", "unique", "masked_select", "bincount", "is_nonzero", "equal",
               "repeat_interleave", "item", "lift_fresh")


class SyncingOpCounter(TorchDispatchMode):
    """Records every dispatched op that synchronises on a CUDA device (for CPU runs)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in SYNCING_OPS:
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


class _CudaSyncWarnings:
    """``set_sync_debug_mode("warn")`` for the duration, every warning kept (location: file:line)."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self._catch = warnings.catch_warnings(record=True)
        self._records: list = []

    def __enter__(self) -> "_CudaSyncWarnings":
        self._records = self._catch.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc) -> None:
        torch.cuda.set_sync_debug_mode("default")
        self._catch.__exit__(*exc)
        self.calls = [f"{Path(w.filename).name}:{w.lineno}" for w in self._records
                      if "synchroniz" in str(w.message)]


class HostSyncCounter(Callback):
    """Counts synchronisations per training step after ``skip_steps`` steps, for ``steps`` steps (None: all).

    Results are in :attr:`per_step` (the calls seen in each step window) and, with ``path``, written to
    a JSON file at the end of fit: steps counted, total, steps with any, and where they came from.
    """

    def __init__(self, path: Optional[str] = None, skip_steps: int = 2, steps: Optional[int] = None) -> None:
        self.path = Path(path) if path else None
        self.skip_steps, self.steps = skip_steps, steps
        self.per_step: list[list[str]] = []
        self._mode = None
        self.device_type = "cpu"

    def _start(self) -> None:
        self._mode = _CudaSyncWarnings() if self.device_type == "cuda" else SyncingOpCounter()
        self._mode.__enter__()

    def _stop(self) -> None:
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self.per_step.append(list(self._mode.calls))
            self._mode = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.device_type = trainer.strategy.root_device.type

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        self._stop()
        done = self.steps is not None and len(self.per_step) >= self.steps
        if trainer.global_step >= self.skip_steps and not done:
            self._start()

    def _close(self) -> None:  # a window open at an epoch end holds validation and checkpointing: drop it
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close()

    def summary(self) -> dict:
        where = Counter(call for calls in self.per_step for call in calls)
        return {"device": self.device_type, "steps": len(self.per_step),
                "syncs": sum(len(c) for c in self.per_step),
                "steps_with_syncs": sum(1 for c in self.per_step if c),
                "where": dict(where.most_common())}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()
        if self.path is not None and trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.summary(), indent=2))
