"""Lightning callbacks of flgc-lightning."""
from flgc_lightning.callbacks.assignment_tracker import AssignmentTracker
from flgc_lightning.callbacks.run_summary import RunSummary
from flgc_lightning.callbacks.step_checkpoint import StepCheckpoint

__all__ = ["AssignmentTracker", "RunSummary", "StepCheckpoint"]
