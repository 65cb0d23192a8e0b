"""Lightning callbacks of this project."""
from flgc_lightning.callbacks.run_summary import RunSummary

__all__ = ["RunSummary"]
