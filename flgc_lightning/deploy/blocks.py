"""The deployed inverted-residual block: residual and depthwise conv handed to a fused FLGC projection.

Same computation as :class:`flgc_lightning.models.mobilenetv2.InvertedResidual` (``conv(x) + shortcut``).
The projection receives the residual branch, so an unequal-group projection adds it in the pass that writes
its output, and compilers see the conv -> add pattern they fuse for dense convs. When the projection runs the
fused kernel, the depthwise conv before it runs inside the same kernel
(``torch.ops.flgc.depthwise_unequal_group_conv``): the widest tensor of the block, the depthwise output, is
never written to memory. Dense, standard-grouped and FLGC networks all deploy through this block.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from flgc_lightning.deploy import native, ops
from flgc_lightning.deploy.grouped import UnequalGroupConv2d


def _fusable_depthwise(stage: nn.Module) -> bool:
    """``Sequential(3x3 depthwise conv with bias, padding 1, stride 1/2, ReLU6)`` as the deploy step builds it."""
    if not (isinstance(stage, nn.Sequential) and len(stage) == 2 and isinstance(stage[1], nn.ReLU6)):
        return False
    conv = stage[0]
    return (type(conv) is nn.Conv2d and conv.groups == conv.in_channels == conv.out_channels
            and conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.dilation == (1, 1)
            and conv.stride in ((1, 1), (2, 2)) and conv.bias is not None and conv.padding_mode == "zeros")


class DeployedInvertedResidual(nn.Module):
    """``conv`` (stages, the last one the projection) ``+`` residual (identity, ``shortcut`` or none)."""

    def __init__(self, conv: nn.Sequential, shortcut: nn.Module | None, use_residual: bool) -> None:
        super().__init__()
        self.conv, self.shortcut, self.use_residual = conv, shortcut, use_residual
        self.fuse_depthwise = True  # False: every stage runs as its own module (cost counters hook modules)
        self.prepare()

    @property
    def projection(self) -> nn.Module:
        return self.conv[-1][0]

    def _unequal_projection(self) -> UnequalGroupConv2d | None:
        last = self.conv[-1]
        return last[0] if len(last) == 1 and isinstance(last[0], UnequalGroupConv2d) else None

    def can_fuse_depthwise(self) -> bool:
        """The projection is an unequal-group layer right after a 3x3 depthwise conv the fused kernel takes."""
        return self._unequal_projection() is not None and len(self.conv) >= 2 and _fusable_depthwise(self.conv[-2])

    def _depthwise_taps(self, conv: nn.Conv2d) -> Tensor:
        """The depthwise weight as the fused kernel reads it (9 x C), rebuilt when the weight changes."""
        if torch.compiler.is_compiling():
            return self._taps
        key = (conv.weight.data_ptr(), conv.weight._version)
        if self.__dict__.get("_taps_key") != key:
            self._taps, self._taps_key = native.depthwise_taps(conv.weight), key
        return self._taps

    def prepare(self) -> None:
        """Build cached kernel inputs now (before ``torch.compile`` / ``torch.export`` trace the block)."""
        if len(self.conv) >= 2 and _fusable_depthwise(self.conv[-2]):
            self._depthwise_taps(self.conv[-2][0])

    def forward(self, x: Tensor) -> Tensor:
        projection, last = self._unequal_projection(), len(self.conv) - 1
        fusable = (self.fuse_depthwise and projection is not None and projection.kernel == "fused" and last >= 1
                   and _fusable_depthwise(self.conv[last - 1]))
        h = x
        for i in range(last - 1 if fusable else last):
            h = self.conv[i](h)
        residual = None
        if self.use_residual:
            residual = x if self.shortcut is None else self.shortcut(x)
        if fusable:
            dw = self.conv[last - 1][0]
            if projection._fused_applies(h):  # h: the depthwise input, as many channels as the projection reads
                t = projection.op_tables()
                return ops.depthwise_unequal_group_conv(
                    h, self._depthwise_taps(dw), dw.bias, dw.stride[0], t["weight"], t["bias"], t["tasks"],
                    t["segments"], t["out_index"], t["dense_weight"], t["dense_bias"], residual, projection.relu6)
            h = self.conv[last - 1](h)
        if projection is not None:
            return projection(h, residual)
        out = self.conv[last](h)
        return out if residual is None else out + residual
