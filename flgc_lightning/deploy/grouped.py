"""A 1x1 convolution whose channels form groups of unequal size, built from standard modules.

No library layer runs unequal groups, so the learned block-diagonal weight is padded to
``G`` equal blocks of ``max_in x max_out`` and run as one standard grouped ``nn.Conv2d``:

    gather inputs (index_select) -> grouped conv -> gather outputs (index_select)

The input gather lays every group out as ``max_in`` consecutive channels (padding slots read
any valid channel and meet zero weights, so the result is exact); the output gather drops the
padding filters and puts the real ones back in the order the consumer expects. Filters of a
group without inputs output only their bias; inputs of a group without filters are never read.
Made of ``index_select`` and ``nn.Conv2d`` only, so TorchScript and ONNX export it as is.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class UnequalGroupConv2d(nn.Module):
    """``y = conv1x1(x)`` restricted to learned groups, with ``y`` in the original filter order.

    Args:
        weight: ``C_out x C_in`` (1x1) weight; only entries inside a group are used.
        bias: ``C_out`` bias (BatchNorm already folded in), or ``None``.
        in_groups: group id of every input channel (``C_in``).
        out_groups: group id of every filter (``C_out``).
        num_groups: ``G``; group ids lie in ``0..G-1`` (groups may be empty on either side).
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, in_groups: Tensor, out_groups: Tensor, num_groups: int) -> None:
        super().__init__()
        weight = weight.reshape(weight.shape[0], weight.shape[1])
        c_out, c_in = weight.shape
        in_groups, out_groups = in_groups.cpu().long(), out_groups.cpu().long()
        self.in_channels, self.out_channels, self.num_groups = c_in, c_out, num_groups
        self.in_sizes = torch.bincount(in_groups, minlength=num_groups).tolist()
        self.out_sizes = torch.bincount(out_groups, minlength=num_groups).tolist()
        max_in, max_out = max(max(self.in_sizes), 1), max(max(self.out_sizes), 1)

        in_index = torch.zeros(num_groups * max_in, dtype=torch.long)  # padding reads channel 0
        out_slot = torch.empty(c_out, dtype=torch.long)
        padded = torch.zeros(num_groups * max_out, max_in, dtype=weight.dtype)
        for g in range(num_groups):
            members_in = torch.nonzero(in_groups == g).flatten()
            members_out = torch.nonzero(out_groups == g).flatten()
            in_index[g * max_in: g * max_in + len(members_in)] = members_in
            slots = g * max_out + torch.arange(len(members_out))
            out_slot[members_out] = slots
            if len(members_in) and len(members_out):
                padded[slots[:, None], torch.arange(len(members_in))[None, :]] = weight[members_out][:, members_in].cpu()
        self.conv = nn.Conv2d(num_groups * max_in, num_groups * max_out, 1, groups=num_groups, bias=bias is not None)
        with torch.no_grad():
            self.conv.weight.copy_(padded[:, :, None, None])
            if bias is not None:
                full_bias = torch.zeros(num_groups * max_out, dtype=weight.dtype)
                full_bias[out_slot] = bias.cpu()
                self.conv.bias.copy_(full_bias)
        self.conv.to(weight.device)
        identity_in = num_groups * max_in == c_in and torch.equal(in_index, torch.arange(c_in))
        identity_out = num_groups * max_out == c_out and torch.equal(out_slot, torch.arange(c_out))
        self.gather_inputs, self.gather_outputs = not identity_in, not identity_out
        self.register_buffer("in_index", in_index.to(weight.device), persistent=False)
        self.register_buffer("out_index", out_slot.to(weight.device), persistent=False)

    @property
    def learned_connections(self) -> int:
        """``sum_g |in_g| * |out_g|``: the multiply-adds per output position that the groups need."""
        return sum(i * o for i, o in zip(self.in_sizes, self.out_sizes))

    def forward(self, x: Tensor) -> Tensor:
        if self.gather_inputs:
            x = x.index_select(1, self.in_index)
        y = self.conv(x)
        if self.gather_outputs:
            y = y.index_select(1, self.out_index)
        return y

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, in_sizes={self.in_sizes}, out_sizes={self.out_sizes}"
