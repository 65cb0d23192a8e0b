"""The deployed inverted-residual block: its residual is added inside the projection conv.

Same computation as :class:`flgc_lightning.models.mobilenetv2.InvertedResidual` (``conv(x) + shortcut``),
but the projection receives the residual branch, so an unequal-group projection adds it in the pass that
writes its output (one memory pass less) and compilers see the conv -> add pattern they fuse for dense
convs. Dense, standard-grouped and FLGC networks all deploy through it, so their timings compare fairly.
"""
from __future__ import annotations

from torch import Tensor, nn

from flgc_lightning.deploy.grouped import UnequalGroupConv2d


class DeployedInvertedResidual(nn.Module):
    """``conv`` (stages, the last one the projection) ``+`` residual (identity, ``shortcut`` or none)."""

    def __init__(self, conv: nn.Sequential, shortcut: nn.Module | None, use_residual: bool) -> None:
        super().__init__()
        self.conv, self.shortcut, self.use_residual = conv, shortcut, use_residual

    @property
    def projection(self) -> nn.Module:
        return self.conv[-1][0]

    def forward(self, x: Tensor) -> Tensor:
        h, last = x, len(self.conv) - 1
        for i, stage in enumerate(self.conv):
            if i == last:
                break
            h = stage(h)
        residual = None
        if self.use_residual:
            residual = x if self.shortcut is None else self.shortcut(x)
        projection = self.conv[last]
        if isinstance(projection[0], UnequalGroupConv2d) and len(projection) == 1:
            return projection[0](h, residual)
        out = projection(h)
        return out if residual is None else out + residual
