"""Networks."""
from flgc_lightning.models.mobilenetv2 import CIFAR_SETTINGS, InvertedResidual, MobileNetV2, make_divisible

__all__ = ["CIFAR_SETTINGS", "InvertedResidual", "MobileNetV2", "make_divisible"]
