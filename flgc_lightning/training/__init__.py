"""Training logic: the LightningModule and the train/test entry points."""
from flgc_lightning.training.module import ImageClassifier

__all__ = ["ImageClassifier"]
