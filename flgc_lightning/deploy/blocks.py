"""The deployed inverted-residual block: residual, expand and depthwise conv handed to a fused FLGC projection.

Same computation as :class:`flgc_lightning.models.mobilenetv2.InvertedResidual` (``conv(x) + shortcut``).
The projection receives the residual branch, so an unequal-group projection adds it in the pass that writes
its output, and compilers see the conv -> add pattern they fuse for dense convs. When the projection runs the
fused kernel, the whole block runs inside one kernel (``torch.ops.flgc.inverted_residual_unequal_group``:
expand 1x1 conv, dense or FLGC, + ReLU6, depthwise 3x3 + ReLU6, projection + residual), so the block's wide
tensors (expand and depthwise outputs) never go to memory; a block without expand conv runs
``torch.ops.flgc.depthwise_unequal_group_conv``. Dense, standard-grouped and FLGC networks all deploy through
this block.
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


def _fusable_expand(stage: nn.Module) -> bool:
    """``Sequential(1x1 conv with bias, ReLU6)`` or an unequal-group 1x1 conv with its ReLU6 folded in."""
    if isinstance(stage, nn.Sequential) and len(stage) == 1 and isinstance(stage[0], UnequalGroupConv2d):
        return stage[0].relu6
    if not (isinstance(stage, nn.Sequential) and len(stage) == 2 and isinstance(stage[1], nn.ReLU6)):
        return False
    conv = stage[0]
    return (type(conv) is nn.Conv2d and conv.groups == 1 and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.padding == (0, 0) and conv.bias is not None)


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

    def can_fuse_block(self) -> bool:
        """:meth:`can_fuse_depthwise`, and an expand conv before the depthwise one that the block kernel takes."""
        return self.can_fuse_depthwise() and len(self.conv) == 3 and _fusable_expand(self.conv[0])

    def _expand_tables(self) -> dict[str, Tensor]:
        """The expand conv as the block kernel reads it (:func:`native.pack` tables, one group for a dense conv)."""
        if torch.compiler.is_compiling():
            return self._etables
        conv = self.conv[0][0]
        if isinstance(conv, UnequalGroupConv2d):
            return conv.fused_tables
        w, b = conv.weight, conv.bias
        key = (w.data_ptr(), w._version, b.data_ptr(), b._version)
        if self.__dict__.get("_etables_key") != key:
            weight, bias = w.detach()[:, :, 0, 0].float(), b.detach().float()
            zeros = torch.zeros(weight.shape[1], dtype=torch.long)
            tables = native.pack(weight, bias, zeros, torch.zeros(weight.shape[0], dtype=torch.long), 1)
            tables["dense_weight"], tables["dense_bias"] = weight.clone(), bias.clone()
            self._etables, self._etables_key = tables, key
        return self._etables

    def prepare(self) -> None:
        """Build cached kernel inputs now (before ``torch.compile`` / ``torch.export`` trace the block)."""
        if len(self.conv) >= 2 and _fusable_depthwise(self.conv[-2]):
            self._depthwise_taps(self.conv[-2][0])
        if len(self.conv) == 3 and _fusable_expand(self.conv[0]):
            self._etables = self._expand_tables()

    def forward(self, x: Tensor) -> Tensor:
        projection, last = self._unequal_projection(), len(self.conv) - 1
        fusable = (self.fuse_depthwise and projection is not None and projection.kernel == "fused" and last >= 1
                   and _fusable_depthwise(self.conv[last - 1]))
        residual = None
        if self.use_residual:
            residual = x if self.shortcut is None else self.shortcut(x)
        if (fusable and last == 2 and _fusable_expand(self.conv[0])
                and projection._fused_applies(x, self.conv[0][0].in_channels)):
            t, e, dw = projection.op_tables(), self._expand_tables(), self.conv[1][0]
            return ops.inverted_residual_unequal_group(
                x, e["weight"], e["bias"], e["tasks"], e["segments"], e["out_index"], e["dense_weight"],
                e["dense_bias"], self._depthwise_taps(dw), dw.bias, dw.stride[0], t["weight"], t["bias"], t["tasks"],
                t["segments"], t["out_index"], t["dense_weight"], t["dense_bias"], residual, projection.relu6)
        h = x
        for i in range(last - 1 if fusable else last):
            h = self.conv[i](h)
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
