"""One place that decides which convolution a "groupable" 1x1 conv becomes."""
from __future__ import annotations

from torch import nn

from flgc_lightning.layers.estimators import AssignGrad
from flgc_lightning.layers.flgc import BalancedFlgc2d, Flgc2d

ASSIGNMENTS = ("learned", "frozen", "balanced")


def make_pointwise_conv(in_channels: int, out_channels: int, groups: int, use_flgc: bool,
                        assignment: str = "learned", init_std: float = 1.0, assign_grad: AssignGrad = "reference",
                        dense_weight_grad: bool = False) -> nn.Conv2d:
    """A bias-free 1x1 conv: dense (``groups == 1``), standard grouped, or FLGC.

    FLGC's ``assignment``: ``"learned"`` (the reference), ``"frozen"`` (the N(0, init_std^2)
    draw never changes: random unequal groups, a control) or ``"balanced"`` (learned, equal sizes).
    ``assign_grad`` / ``dense_weight_grad``: the gradient estimator of FLGC layers (see :class:`Flgc2d`).
    With ``use_flgc`` and ``groups == 1`` the layer is plain dense: a single learned group is the
    dense convolution, and the reference's dense baseline has no assignment maps.
    """
    if assignment not in ASSIGNMENTS:
        raise ValueError(f"assignment must be one of {', '.join(ASSIGNMENTS)}, got {assignment!r}")
    if groups == 1:
        return nn.Conv2d(in_channels, out_channels, 1, bias=False)
    if use_flgc:
        layer = BalancedFlgc2d if assignment == "balanced" else Flgc2d
        return layer(in_channels, out_channels, 1, groups=groups, bias=False, init_std=init_std,
                     learn_assignments=assignment != "frozen", assign_grad=assign_grad,
                     dense_weight_grad=dense_weight_grad)
    if in_channels % groups or out_channels % groups:
        raise ValueError(
            f"standard grouped conv {in_channels}->{out_channels} needs both channel counts "
            f"divisible by groups={groups}"
        )
    return nn.Conv2d(in_channels, out_channels, 1, groups=groups, bias=False)
