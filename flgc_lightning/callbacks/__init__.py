"""Lightning callbacks of flgc-lightning."""
from flgc_lightning.callbacks.assignment_tracker import AssignmentTracker

__all__ = ["AssignmentTracker"]
