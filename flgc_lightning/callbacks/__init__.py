"""Lightning callbacks of flgc-lightning."""
from flgc_lightning.callbacks.assignment_tracker import AssignmentTracker
from flgc_lightning.callbacks.ema import EMA
from flgc_lightning.callbacks.host_syncs import HostSyncCounter
from flgc_lightning.callbacks.preemption import Preemption
from flgc_lightning.callbacks.run_summary import RunSummary
from flgc_lightning.callbacks.step_checkpoint import StepCheckpoint

__all__ = ["AssignmentTracker", "EMA", "HostSyncCounter", "Preemption", "RunSummary", "StepCheckpoint"]
