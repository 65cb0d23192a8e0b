"""Datasets and LightningDataModules: uint8 splits, batches planned per epoch, augmentation on the device."""
from flgc_lightning.data.augment import BatchTransform, EpochPlan, ImageBatch
from flgc_lightning.data.base import ImageClassificationDataModule
from flgc_lightning.data.batches import ResidentImages
from flgc_lightning.data.cifar import CifarDataModule
from flgc_lightning.data.cifar_files import DataNotFoundError
from flgc_lightning.data.digits import DigitsDataModule
from flgc_lightning.data.imagefolder import ImageFolderDataModule

__all__ = ["BatchTransform", "CifarDataModule", "DataNotFoundError", "DigitsDataModule", "EpochPlan", "ImageBatch",
           "ImageClassificationDataModule", "ImageFolderDataModule", "ResidentImages"]
