"""Fully Learnable Group Convolution (Wang et al., CVPR 2019), REFERENCE.md section 1.

The layer keeps a dense weight plus two assignment-logit matrices and, on every
forward pass, masks the weight so that a filter only sees the input channels of
its own (learned) group. Groups are unequal and may be empty on either side.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def group_ids(logits: Tensor) -> Tensor:
    """Group id of every row (channel): argmax of the row-wise softmax, the first index on ties.

    The one definition of "which group a channel is in", shared by the layer, the assignment
    records (which also read logits straight from checkpoints) and the cost counters.
    """
    return torch.softmax(logits.detach(), dim=1).argmax(dim=1)


def straight_through_one_hot(logits: Tensor) -> Tensor:
    """Row-wise one-hot of ``argmax(softmax(logits))`` with a straight-through gradient.

    Forward value is exactly the 0/1 one-hot (one group per row even on ties:
    ``torch.argmax`` returns the first maximal index). Backward passes
    ``grad_P = grad_B * B`` into the softmax, i.e. only the selected entry gets a
    gradient. Written without a custom autograd function or in-place edits:
    ``B + (P*B - (P*B).detach())`` equals ``B`` bit for bit (x - x == 0) while its
    derivative w.r.t. ``P`` is ``B``.
    """
    probs = torch.softmax(logits, dim=1)
    hard = F.one_hot(probs.argmax(dim=1), num_classes=logits.shape[1]).to(probs.dtype)
    selected = probs * hard
    return hard + (selected - selected.detach())


class Flgc2d(nn.Conv2d):
    """Drop-in ``nn.Conv2d`` whose input channels and filters learn their group.

    ``groups`` is the number of learned groups ``G`` (any positive integer; it need
    not divide the channel counts and may exceed them). The underlying convolution
    is dense (``nn.Conv2d.groups == 1``); the group count is stored as
    ``num_groups``. Subclassing ``nn.Conv2d`` keeps initialisers and
    ``isinstance`` checks working; FLOP counters need the hook in
    :mod:`flgc_lightning.utils.complexity` because they match types exactly.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
    ) -> None:
        if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
            raise ValueError(f"Flgc2d: groups must be a positive integer, got {groups!r}")
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation,
            groups=1, bias=bias, padding_mode=padding_mode, device=device, dtype=dtype,
        )
        self.num_groups = groups
        factory = {"device": device, "dtype": dtype}
        self.in_assign = nn.Parameter(torch.empty(in_channels, groups, **factory))
        self.out_assign = nn.Parameter(torch.empty(out_channels, groups, **factory))
        self.reset_assignments()

    def reset_assignments(self) -> None:
        """Draw both assignment-logit matrices from N(0, 1), as the reference does."""
        nn.init.normal_(self.in_assign, 0.0, 1.0)
        nn.init.normal_(self.out_assign, 0.0, 1.0)

    def connection_mask(self) -> Tensor:
        """``M = B_out @ B_in^T`` (C_out x C_in), 1 where filter and input share a group."""
        b_in = straight_through_one_hot(self.in_assign)
        b_out = straight_through_one_hot(self.out_assign)
        return b_out @ b_in.t()

    def masked_weight(self) -> Tensor:
        return self.weight * self.connection_mask()[:, :, None, None].to(self.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.masked_weight(), self.bias)

    def input_groups(self) -> Tensor:
        """Current group id (0..G-1) of every input channel, shape ``(C_in,)``."""
        return group_ids(self.in_assign)

    def filter_groups(self) -> Tensor:
        """Current group id (0..G-1) of every filter (output channel), shape ``(C_out,)``."""
        return group_ids(self.out_assign)

    def group_sizes(self) -> tuple[Tensor, Tensor]:
        """Channels per group (inputs, filters), each of shape ``(G,)`` on the CPU; groups may be empty."""
        return (torch.bincount(self.input_groups().cpu(), minlength=self.num_groups),
                torch.bincount(self.filter_groups().cpu(), minlength=self.num_groups))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", learned_groups={self.num_groups}"
