"""The deployed inverted-residual block: residual, expand and depthwise conv handed to a fused FLGC projection.

Same computation as :class:`flgc_lightning.models.mobilenetv2.InvertedResidual` (``conv(x) + shortcut``).
The projection receives the residual branch, so an unequal-group projection adds it in the pass that writes
its output, and compilers see the conv -> add pattern they fuse for dense convs. When the projection runs the
fused kernel, the whole block is one step of the kernel (``torch.ops.flgc.fused_step``: expand 1x1 conv, dense or
FLGC, + ReLU6, depthwise 3x3 + ReLU6, projection + residual), so the block's wide tensors (expand and depthwise
outputs) never go to memory; a block without expand conv is a depthwise + projection step. Dense,
standard-grouped and FLGC networks all deploy through this block.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from flgc_lightning.deploy import tables
from flgc_lightning.deploy.grouped import CACHE, DerivedState, UnequalGroupConv2d, cached, fused_input, kernel_available


def _fusable_depthwise(stage: nn.Module) -> bool:
    """``Sequential(3x3 depthwise conv with bias, padding 1, stride 1/2, ReLU6)`` as the deploy step builds it."""
    if not (isinstance(stage, nn.Sequential) and len(stage) == 2 and isinstance(stage[1], nn.ReLU6)):
        return False
    conv = stage[0]
    return (type(conv) is nn.Conv2d and conv.groups == conv.in_channels == conv.out_channels
            and conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.dilation == (1, 1)
            and conv.stride in ((1, 1), (2, 2)) and conv.bias is not None and conv.padding_mode == "zeros")


def _fusable_expand(stage: nn.Module) -> bool:
    """``Sequential(1x1 conv with bias, ReLU6)`` or an unequal-group 1x1 conv with its ReLU6 folded in."""
    if isinstance(stage, nn.Sequential) and len(stage) == 1 and isinstance(stage[0], UnequalGroupConv2d):
        return stage[0].relu6
    if not (isinstance(stage, nn.Sequential) and len(stage) == 2 and isinstance(stage[1], nn.ReLU6)):
        return False
    conv = stage[0]
    return (type(conv) is nn.Conv2d and conv.groups == 1 and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.padding == (0, 0) and conv.bias is not None)


def _expand_tables(conv: nn.Module) -> dict[str, Tensor]:
    """The expand conv as the kernel reads it: an unequal-group layer's tables, a dense conv's as one group."""
    if isinstance(conv, UnequalGroupConv2d):
        return conv.tables()
    weight = conv.weight.detach()[:, :, 0, 0].float()
    return tables.pack(weight, conv.bias, torch.zeros(weight.shape[1], dtype=torch.long),
                       torch.zeros(weight.shape[0], dtype=torch.long), 1)


class DeployedInvertedResidual(DerivedState):
    """``conv`` (stages, the last one the projection) ``+`` residual (identity, ``shortcut`` or none)."""

    def __init__(self, conv: nn.Sequential, shortcut: nn.Module | None, use_residual: bool) -> None:
        super().__init__()
        self.conv, self.shortcut, self.use_residual = conv, shortcut, use_residual
        self.fuse_depthwise = True  # False: every stage runs as its own module (cost counters hook modules)

    @property
    def projection(self) -> nn.Module:
        return self.conv[-1][0]

    def _unequal_projection(self) -> UnequalGroupConv2d | None:
        last = self.conv[-1]
        return last[0] if len(last) == 1 and isinstance(last[0], UnequalGroupConv2d) else None

    def _fusable(self) -> tuple[UnequalGroupConv2d | None, nn.Conv2d | None, nn.Module | None]:
        """``(projection, depthwise conv, expand conv)`` a fused step takes along (``None`` where it does not): the
        stages' structure, worked out again only when a stage's module was replaced (walking the ``Sequential``
        stages on every call cost as much as a small kernel at batch 1)."""
        modules = [m for stage in self.conv._modules.values() for m in stage._modules.values()]
        seen, found = self.__dict__.get(CACHE + "fusable", ((), None))
        if len(seen) != len(modules) or any(a is not b for a, b in zip(seen, modules)):
            projection = self._unequal_projection()
            dw = self.conv[-2][0] if projection is not None and len(self.conv) >= 2 and _fusable_depthwise(
                self.conv[-2]) else None
            expand = self.conv[0][0] if dw is not None and len(self.conv) == 3 and _fusable_expand(self.conv[0]) \
                else None
            found = (projection, dw, expand)
            self.__dict__[CACHE + "fusable"] = (tuple(modules), found)
        return found

    def can_fuse_depthwise(self) -> bool:
        """The projection is an unequal-group layer right after a 3x3 depthwise conv the fused kernel takes."""
        return self._fusable()[1] is not None

    def can_fuse_block(self) -> bool:
        """:meth:`can_fuse_depthwise`, and an expand conv before the depthwise one that the kernel takes along."""
        return self._fusable()[2] is not None

    def step(self) -> tuple[Tensor, Tensor]:
        """The block (from its expand conv, or from its depthwise conv) as one fused step (:func:`tables.make_step`)."""
        projection, dw, expand = self._fusable()
        flgc_expand = isinstance(expand, UnequalGroupConv2d)
        sources = [*projection.sources(), dw.weight, dw.bias, *(
            expand.sources() if flgc_expand else [] if expand is None else [expand.weight, expand.bias])]
        return cached(self, "step", sources, lambda: tables.make_step(
            projection.tables(), dw.in_channels if expand is None else expand.in_channels, projection.out_channels,
            projection.relu6, None if expand is None else _expand_tables(expand), tables.depthwise_taps(dw.weight),
            dw.bias, dw.stride[0]), lambda: (*projection.settings(), projection.relu6, dw.stride[0], expand is None,
                                             *(expand.settings() if flgc_expand else ())))

    def prepare(self) -> None:
        """Build the block's step now (before ``torch.compile`` / ``torch.export`` trace the block)."""
        projection, dw, _ = self._fusable()
        if dw is not None and projection.kernel == "fused":
            self.step()

    def forward(self, x: Tensor) -> Tensor:
        projection, dw, expand = self._fusable()
        last = len(self.conv) - 1
        fused = (self.fuse_depthwise and dw is not None and projection.kernel == "fused" and fused_input(x)
                 and kernel_available())
        residual = None
        if self.use_residual:
            residual = x if self.shortcut is None else self.shortcut(x)
        h = x
        if fused and (residual is None or residual.dtype == torch.float32):
            for i in range(0 if expand is not None else last - 1):
                h = self.conv[i](h)
            ints, floats = self.step()
            return torch.ops.flgc.fused_step(h, ints, floats, residual, projection.out_channels, dw.stride[0])
        for i in range(last):
            h = self.conv[i](h)
        if projection is not None:
            return projection(h, residual)
        out = self.conv[last](h)
        return out if residual is None else out + residual
