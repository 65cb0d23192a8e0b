"""Datasets and LightningDataModules."""
from flgc_lightning.data.cifar import ArrayImageDataset, CifarDataModule, reference_transforms
from flgc_lightning.data.cifar_files import DataNotFoundError

__all__ = ["ArrayImageDataset", "CifarDataModule", "DataNotFoundError", "reference_transforms"]
