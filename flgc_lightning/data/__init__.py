"""Datasets and LightningDataModules."""
from flgc_lightning.data.base import ImageClassificationDataModule
from flgc_lightning.data.cifar import ArrayImageDataset, CifarDataModule, reference_transforms
from flgc_lightning.data.cifar_files import DataNotFoundError
from flgc_lightning.data.digits import DigitsDataModule
from flgc_lightning.data.imagefolder import ImageFolderDataModule

__all__ = ["ArrayImageDataset", "CifarDataModule", "DataNotFoundError", "DigitsDataModule", "ImageClassificationDataModule",
           "ImageFolderDataModule", "reference_transforms"]
