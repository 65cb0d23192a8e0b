"""Stop cleanly when asked to: SIGTERM (cluster preemption, ``timeout``), Ctrl-C, SLURM's requeue signal.

Lightning already turns SIGTERM into a stop at the next training-step boundary (its
``SIGTERMException``; under DDP rank 0's decision is broadcast, so all ranks stop at the same step).
This callback routes the other stop signals through the same path and adds what a run needs:

- **a resumable checkpoint**: :class:`~flgc_lightning.callbacks.StepCheckpoint` writes ``last.ckpt``
  when the stop happens (``on_exception``), so no step is lost and the resume is exact;
- **validation finishes first**: a signal that arrives during validation is passed on when
  validation ends, right after the epoch-end checkpoint, instead of cutting it (a checkpoint taken
  mid-validation cannot reproduce that epoch's metrics);
- **Ctrl-C twice**: the first Ctrl-C stops at the next step boundary like SIGTERM, a second one stops at once
  (the previous ``last.ckpt`` stays intact: checkpoints are written atomically);
- **SLURM auto-requeue**: on the requeue signal (``SIGUSR1``, Lightning's default; send it with
  ``sbatch --signal=USR1@90``) the run stops at the step boundary, writes ``last.ckpt`` and calls
  ``scontrol requeue`` for its job. The requeued job runs the same command in the same run directory
  and continues from that ``last.ckpt`` (see :func:`flgc_lightning.training.run.train`). Lightning's
  own handler would save inside the signal handler, at whatever point of a step the signal hit.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from typing import Any, Optional

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


def slurm_job_id() -> Optional[str]:
    """The id ``scontrol requeue`` takes for this job (``ARRAYJOB_TASK`` for array jobs)."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID")


class Preemption(Callback):
    """Route SIGINT and the requeue signal into Lightning's step-boundary stop; requeue on SLURM.

    Args:
        requeue_signal: signal name that asks for a SLURM requeue (``null``: none).
    """

    def __init__(self, requeue_signal: Optional[str] = "SIGUSR1") -> None:
        self.requeue_signal = getattr(signal, requeue_signal) if requeue_signal else None
        self.received: Optional[int] = None  # the first stop signal
        self._trainer: Optional[pl.Trainer] = None
        self._lightning_sigterm: Any = None
        self._previous: dict[int, Any] = {}
        self._deferred = False
        self._taken_back = False

    @property
    def requeue(self) -> bool:
        return self.received is not None and self.received == self.requeue_signal

    # -- signals ---------------------------------------------------------------------------
    def _install(self, *signums: int) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only
        for signum in signums:
            if signum is not None and signum not in self._previous:
                self._previous[signum] = signal.signal(signum, self._handle)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Before Lightning registers its handlers: with ours in place it adds no immediate-save SLURM handler.
        self._trainer = trainer
        if stage == "fit":
            self._install(self.requeue_signal)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning installs its SIGTERM handler just before training (after on_fit_start); ours wraps it.
        self._lightning_sigterm = signal.getsignal(signal.SIGTERM)
        self._install(signal.SIGTERM, signal.SIGINT)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        if self.received is None:
            self.received = signum
            name = signal.Signals(signum).name
            log.warning("%s received: stopping at the next step boundary with a resumable checkpoint%s", name,
                        " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else "")
        trainer = self._trainer
        if trainer is not None and (trainer.validating or trainer.sanity_checking):
            self._deferred = True  # let validation finish: its metrics cannot be resumed half-way
            return
        self._stop()

    def _stop(self) -> None:
        """Hand the stop to Lightning: it sets ``trainer.received_sigterm`` and forwards SIGTERM to DDP workers."""
        if callable(self._lightning_sigterm):
            self._lightning_sigterm(signal.SIGTERM, None)
        elif self._trainer is not None:
            self._trainer._signal_connector.received_sigterm = True

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A stop handed to Lightning during an epoch's last training step: Lightning lets the epoch's validation
        # start, then aborts it at the first batch that is not the last one, before the epoch-end checkpoint is
        # written, so the run would lose the epoch (and under DDP one rank would leave validation alone). Take
        # the stop back until validation has finished; the epoch then ends with its checkpoint and stops.
        if self.received is not None and not trainer.sanity_checking and trainer.received_sigterm:
            trainer._signal_connector.received_sigterm = False
            self._taken_back = True

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if self._taken_back:  # Lightning's handler already ran (and signalled worker processes): set its flag again
            self._taken_back = False
            trainer._signal_connector.received_sigterm = True
        if self._deferred:
            self._deferred = False
            self._stop()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._deferred:  # deferred during the sanity check
            self._deferred = False
            self._stop()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore()

    # -- after the stop ----------------------------------------------------------------------
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Runs after StepCheckpoint's ``on_exception`` (listed after it), so ``last.ckpt`` is on disk."""
        self._restore()
        if not isinstance(exception, SIGTERMException) or not self.requeue or not trainer.is_global_zero:
            return
        job = slurm_job_id()
        if job is None:
            log.warning("requeue signal received outside a SLURM job: not requeued")
            return
        try:
            done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
            message = done.stderr.strip() or done.stdout.strip()
            if done.returncode == 0:
                log.info("requeued SLURM job %s", job)
            else:
                log.warning("scontrol requeue %s failed (exit %d): %s", job, done.returncode, message)
        except (OSError, subprocess.SubprocessError) as err:
            log.warning("scontrol requeue %s failed: %s", job, err)
