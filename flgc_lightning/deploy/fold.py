"""BatchNorm folding: conv followed by eval-mode BN becomes one conv with a bias (exact up to rounding)."""
from __future__ import annotations

import torch
from torch import Tensor, nn


@torch.no_grad()
def bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Per-channel ``(scale, shift)`` with ``bn(y) == y * scale + shift`` in eval mode."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale
    return scale, shift


@torch.no_grad()
def fold_bn_into_weight(weight: Tensor, bias: Tensor | None, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """``(W', b')`` of the conv ``bn(conv(x; W, b))`` in float64, returned in ``weight``'s dtype."""
    scale, shift = (t.double() for t in bn_scale_shift(bn))
    w = weight.double() * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    b = shift if bias is None else bias.double() * scale + shift
    return w.to(weight.dtype), b.to(weight.dtype)
