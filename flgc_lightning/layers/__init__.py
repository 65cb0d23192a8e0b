"""Convolution layers: the FLGC layer and the factory that picks dense / grouped / FLGC."""
from flgc_lightning.layers.flgc import Flgc2d, group_ids, straight_through_one_hot
from flgc_lightning.layers.factory import make_pointwise_conv

__all__ = ["Flgc2d", "group_ids", "straight_through_one_hot", "make_pointwise_conv"]
