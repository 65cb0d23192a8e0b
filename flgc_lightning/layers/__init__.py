"""Convolution layers: the FLGC layer (learned, frozen or balanced groups) and the factory that picks dense / grouped / FLGC."""
from flgc_lightning.layers.flgc import (
    BalancedFlgc2d, Flgc2d, balanced_group_ids, group_ids, straight_through, straight_through_one_hot,
)
from flgc_lightning.layers.estimators import ASSIGN_GRADS, AssignGrad
from flgc_lightning.layers.factory import ASSIGNMENTS, make_pointwise_conv

__all__ = ["ASSIGNMENTS", "ASSIGN_GRADS", "AssignGrad", "BalancedFlgc2d", "Flgc2d", "balanced_group_ids", "group_ids", "make_pointwise_conv",
           "straight_through", "straight_through_one_hot"]
