"""One place that decides which convolution a "groupable" 1x1 conv becomes."""
from __future__ import annotations

from torch import nn

from flgc_lightning.layers.flgc import Flgc2d


def make_pointwise_conv(in_channels: int, out_channels: int, groups: int, use_flgc: bool) -> nn.Conv2d:
    """A bias-free 1x1 conv: dense (``groups == 1``), standard grouped, or FLGC.

    With ``use_flgc`` and ``groups == 1`` the layer is plain dense: a single
    learned group is the dense convolution, and the reference's dense baseline
    has no assignment maps.
    """
    if groups == 1:
        return nn.Conv2d(in_channels, out_channels, 1, bias=False)
    if use_flgc:
        return Flgc2d(in_channels, out_channels, 1, groups=groups, bias=False)
    if in_channels % groups or out_channels % groups:
        raise ValueError(
            f"standard grouped conv {in_channels}->{out_channels} needs both channel counts "
            f"divisible by groups={groups}"
        )
    return nn.Conv2d(in_channels, out_channels, 1, groups=groups, bias=False)
