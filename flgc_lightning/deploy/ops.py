"""The fused kernels as PyTorch custom ops: ``torch.ops.flgc.unequal_group_conv1x1`` and
``torch.ops.flgc.depthwise_unequal_group_conv`` (a 3x3 depthwise conv + ReLU6 feeding it, in one pass).

Registered with ``torch.library`` (with a fake implementation for shapes), so ``torch.compile`` keeps it as
one opaque node inside the compiled graph (instead of breaking the graph around a ctypes call) and
``torch.export`` writes it into ``.pt2`` programs. Importing this module (``flgc_lightning.deploy`` does)
registers the op; that is all a process needs to load such a program.

The op carries its own exact fallback: where the compiled kernel cannot be built (no C compiler), it runs
a block-diagonal dense ``conv2d`` with the same weights, so a program exported on one machine gives the
same numbers on another.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from flgc_lightning.deploy import native

_warned = False


def reference(x: Tensor, dense_weight: Tensor, dense_bias: Tensor, residual: Tensor | None, relu6: bool) -> Tensor:
    """What the kernel computes, with stock ops: ``act(conv1x1(x, W_blockdiag) + b [+ residual])``."""
    y = F.conv2d(x, dense_weight[:, :, None, None], dense_bias)
    if residual is not None:
        y = y + residual
    if relu6:
        y = y.clamp(0.0, 6.0)
    return y.contiguous(memory_format=torch.channels_last)


@torch.library.custom_op("flgc::unequal_group_conv1x1", mutates_args=())
def unequal_group_conv1x1(x: Tensor, weight: Tensor, bias: Tensor, tasks: Tensor, segments: Tensor,
                          out_index: Tensor, dense_weight: Tensor, dense_bias: Tensor, residual: Tensor | None,
                          relu6: bool) -> Tensor:
    """Unequal-group 1x1 conv of ``x`` (CPU float32); ``weight`` .. ``out_index`` are :func:`native.pack`'s
    tables, ``dense_weight``/``dense_bias`` the same layer as a ``C_out x C_in`` block-diagonal matrix (fallback)."""
    global _warned
    supported = x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
    if supported and x.shape[1] == dense_weight.shape[1] and native.available():
        tables = {"weight": weight, "bias": bias, "tasks": tasks, "segments": segments, "out_index": out_index}
        return native.unequal_group_conv1x1(x, tables, dense_weight.shape[0], residual, relu6)
    if supported and not native.available() and not _warned:
        _warned = True
        warnings.warn("fused unequal-group kernel unavailable (no working C compiler); the op runs a "
                      "block-diagonal dense conv instead (same numbers)", stacklevel=2)
    return reference(x, dense_weight, dense_bias, residual, relu6)


@unequal_group_conv1x1.register_fake
def _(x, weight, bias, tasks, segments, out_index, dense_weight, dense_bias, residual, relu6):
    n, _, h, w = x.shape
    return torch.empty((n, dense_weight.shape[0], h, w), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last)


def depthwise_reference(x: Tensor, dw_taps: Tensor, dw_bias: Tensor, stride: int) -> Tensor:
    """``relu6(depthwise3x3(x) + dw_bias)`` with stock ops (padding 1)."""
    c = dw_taps.shape[1]
    weight = dw_taps.t().reshape(c, 1, 3, 3)
    return F.conv2d(x, weight, dw_bias, stride, 1, 1, c).clamp(0.0, 6.0)


@torch.library.custom_op("flgc::depthwise_unequal_group_conv", mutates_args=())
def depthwise_unequal_group_conv(x: Tensor, dw_taps: Tensor, dw_bias: Tensor, stride: int, weight: Tensor, bias: Tensor,
                                 tasks: Tensor, segments: Tensor, out_index: Tensor, dense_weight: Tensor,
                                 dense_bias: Tensor, residual: Tensor | None, relu6: bool) -> Tensor:
    """:func:`unequal_group_conv1x1` of ``relu6(depthwise3x3(x, stride, padding 1))``, without writing the
    depthwise output to memory; ``dw_taps``: ``9 x C`` (:func:`native.depthwise_taps`)."""
    supported = x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
    if supported and x.shape[1] == dw_taps.shape[1] == dense_weight.shape[1] and native.available():
        tables = {"weight": weight, "bias": bias, "tasks": tasks, "segments": segments, "out_index": out_index}
        return native.depthwise_unequal_group_conv(x, dw_taps, dw_bias, stride, tables, dense_weight.shape[0],
                                                   residual, relu6)
    hidden = depthwise_reference(x, dw_taps, dw_bias, stride)
    return unequal_group_conv1x1(hidden, weight, bias, tasks, segments, out_index, dense_weight, dense_bias,
                                 residual, relu6)


@depthwise_unequal_group_conv.register_fake
def _(x, dw_taps, dw_bias, stride, weight, bias, tasks, segments, out_index, dense_weight, dense_bias, residual,
      relu6):
    n, _, h, w = x.shape
    return torch.empty((n, dense_weight.shape[0], (h - 1) // stride + 1, (w - 1) // stride + 1), dtype=x.dtype,
                       device=x.device, memory_format=torch.channels_last)


@torch.library.custom_op("flgc::inverted_residual_unequal_group", mutates_args=())
def inverted_residual_unequal_group(x: Tensor, e_weight: Tensor, e_bias: Tensor, e_tasks: Tensor, e_segments: Tensor,
                                    e_out_index: Tensor, e_dense_weight: Tensor, e_dense_bias: Tensor, dw_taps: Tensor,
                                    dw_bias: Tensor, stride: int, weight: Tensor, bias: Tensor, tasks: Tensor,
                                    segments: Tensor, out_index: Tensor, dense_weight: Tensor, dense_bias: Tensor,
                                    residual: Tensor | None, relu6: bool) -> Tensor:
    """A whole inverted-residual block: :func:`depthwise_unequal_group_conv` of ``relu6(expand(x))``, the expand
    1x1 conv given by ``e_*`` (the same kind of tables; one group for a dense conv). Neither the expanded nor the
    depthwise tensor is written to memory."""
    supported = x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
    hidden = e_dense_weight.shape[0]
    if (supported and x.shape[1] == e_dense_weight.shape[1] and dw_taps.shape[1] == hidden == dense_weight.shape[1]
            and native.available()):
        expand = {"weight": e_weight, "bias": e_bias, "tasks": e_tasks, "segments": e_segments,
                  "out_index": e_out_index}
        tables = {"weight": weight, "bias": bias, "tasks": tasks, "segments": segments, "out_index": out_index}
        return native.inverted_residual_unequal_group(x, expand, hidden, dw_taps, dw_bias, stride, tables,
                                                      dense_weight.shape[0], residual, relu6)
    expanded = reference(x, e_dense_weight, e_dense_bias, None, True)
    return depthwise_unequal_group_conv(expanded, dw_taps, dw_bias, stride, weight, bias, tasks, segments, out_index,
                                        dense_weight, dense_bias, residual, relu6)


@inverted_residual_unequal_group.register_fake
def _(x, e_weight, e_bias, e_tasks, e_segments, e_out_index, e_dense_weight, e_dense_bias, dw_taps, dw_bias, stride,
      weight, bias, tasks, segments, out_index, dense_weight, dense_bias, residual, relu6):
    n, _, h, w = x.shape
    return torch.empty((n, dense_weight.shape[0], (h - 1) // stride + 1, (w - 1) // stride + 1), dtype=x.dtype,
                       device=x.device, memory_format=torch.channels_last)
