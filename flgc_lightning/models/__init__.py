"""Networks."""
from flgc_lightning.models.mobilenetv2 import (
    CIFAR_SETTINGS, InvertedResidual, MobileNetV2, block_specs, groupable_convs, make_divisible,
)

__all__ = ["CIFAR_SETTINGS", "InvertedResidual", "MobileNetV2", "block_specs", "groupable_convs", "make_divisible"]
