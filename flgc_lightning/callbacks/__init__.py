"""Lightning callbacks of flgc-lightning."""
from flgc_lightning.callbacks.assignment_tracker import AssignmentTracker
from flgc_lightning.callbacks.run_summary import RunSummary

__all__ = ["AssignmentTracker", "RunSummary"]
