"""Fully Learnable Group Convolution (Wang et al., CVPR 2019), REFERENCE.md section 1.

The layer keeps a dense weight plus two assignment-logit matrices and, on every
forward pass, masks the weight so that a filter only sees the input channels of
its own (learned) group. Groups are unequal and may be empty on either side. Two controls share the layer:
frozen assignments (``learn_assignments=False``: the N(0, 1) draw stays, same unequal-group cost,
no learning) and :class:`BalancedFlgc2d` (learned membership, equal group sizes).
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


def balanced_group_ids(logits: Tensor, rounds: int | None = None) -> Tensor:
    """Group id of every row such that every group gets exactly ``rows / G`` rows (``G`` divides ``rows``).

    Deferred acceptance: every row proposes to the groups in the order of its logits (highest
    first); a group keeps the ``rows / G`` proposers with the highest logit for it (ties: lower
    row index) and rejects the rest, who propose to their next group in the next round. Rounds
    run a fixed number of times (``rounds``, default ``2G + 2``: no data-dependent loop, so no host
    sync on a GPU). After them only the proposals a group holds count as placed; rows still
    unplaced (never seen with the default in our tests, but possible in principle) fill the free
    places in row order, so the sizes are exactly equal whatever the number of rounds. When the
    rounds suffice, the result is the stable matching that gives each row the best group it can keep.
    """
    logits = logits.detach()
    rows, groups = logits.shape
    capacity = rows // groups
    if capacity * groups != rows:
        raise ValueError(f"balanced groups need {groups} to divide {rows} channels")
    preference = torch.argsort(logits, dim=1, descending=True, stable=True)
    choice = torch.zeros(rows, dtype=torch.long, device=logits.device)
    row = torch.arange(rows, device=logits.device)
    slots = torch.arange(groups, device=logits.device)

    def propose(choice: Tensor) -> tuple[Tensor, Tensor]:
        """Every row's current proposal and whether its group rejects it (over capacity, or no choice left)."""
        proposal = preference[row, choice.clamp(max=groups - 1)]
        score = torch.where(choice < groups, logits[row, proposal], torch.full_like(logits[:, 0], -torch.inf))
        by_score = torch.argsort(score, descending=True, stable=True)
        order = by_score[torch.argsort(proposal[by_score], stable=True)]  # group, then score, then row
        first = torch.searchsorted(proposal[order], slots)
        rank = torch.empty_like(order)
        rank[order] = row - first[proposal[order]]
        return proposal, (rank >= capacity) | (choice >= groups)

    for _ in range(2 * groups + 2 if rounds is None else rounds):
        choice = choice + propose(choice)[1].long()
    proposal, rejected = propose(choice)
    placed = ~rejected
    # Unplaced rows take the free places, in row order.
    taken = torch.zeros(groups, dtype=torch.long, device=logits.device).scatter_add_(0, proposal, placed.long())
    free_until = torch.cumsum(capacity - taken, 0)
    unplaced_rank = torch.cumsum((~placed).long(), 0) - 1
    slot = torch.searchsorted(free_until, unplaced_rank, right=True).clamp(max=groups - 1)
    return torch.where(placed, proposal, slot)


def straight_through_one_hot(logits: Tensor) -> Tensor:
    """Row-wise one-hot of ``argmax(softmax(logits))`` with a straight-through gradient.

    Forward value is exactly the 0/1 one-hot (one group per row even on ties:
    ``torch.argmax`` returns the first maximal index). Backward passes
    ``grad_P = grad_B * B`` into the softmax, i.e. only the selected entry gets a
    gradient. Written without a custom autograd function or in-place edits:
    ``B + (P*B - (P*B).detach())`` equals ``B`` bit for bit (x - x == 0) while its
    derivative w.r.t. ``P`` is ``B``.
    """
    return straight_through(logits, torch.softmax(logits, dim=1).argmax(dim=1))


def straight_through(logits: Tensor, ids: Tensor) -> Tensor:
    """One-hot of ``ids`` in value; gradient ``grad_B * B`` into the row-wise softmax of ``logits``."""
    probs = torch.softmax(logits, dim=1)
    # scatter, not F.one_hot: one_hot checks the ids' range on the host, a device sync per call on GPUs
    hard = torch.zeros_like(probs).scatter_(1, ids[:, None], 1.0)
    selected = probs * hard
    return hard + (selected - selected.detach())


ASSIGN_GRADS = ("reference", "ste", "gumbel")


def straight_through_full(logits: Tensor, ids: Tensor, probs: Tensor | None = None) -> Tensor:
    """One-hot of ``ids`` in value; the whole gradient ``grad_B`` into ``probs`` (default: the row softmax).

    Unlike :func:`straight_through`, every entry of a row gets a gradient, so the unselected groups'
    logits move by how much the loss wants each of them, not in proportion to their probability.
    """
    probs = torch.softmax(logits, dim=1) if probs is None else probs
    hard = torch.zeros_like(probs).scatter_(1, ids[:, None], 1.0)
    return hard + (probs - probs.detach())


class _DenseWeightGrad(torch.autograd.Function):
    """``weight * mask`` whose weight gradient is not masked: weights between a filter and the inputs of other
    groups keep training, so what a channel would contribute in another group is measured with trained weights."""

    @staticmethod
    def forward(ctx, weight: Tensor, mask: Tensor) -> Tensor:
        ctx.save_for_backward(weight)
        ctx.mask_shape = mask.shape
        return weight * mask

    @staticmethod
    def backward(ctx, grad: Tensor):
        (weight,) = ctx.saved_tensors
        return grad, (grad * weight).sum_to_size(ctx.mask_shape)


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
        init_std: float = 1.0,
        learn_assignments: bool = True,
        assign_grad: str = "reference",
        dense_weight_grad: bool = False,
    ) -> None:
        if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
            raise ValueError(f"Flgc2d: groups must be a positive integer, got {groups!r}")
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation,
            groups=1, bias=bias, padding_mode=padding_mode, device=device, dtype=dtype,
        )
        if not init_std > 0:
            raise ValueError(f"assign_init_std must be > 0, got {init_std!r}")
        if assign_grad not in ASSIGN_GRADS:
            raise ValueError(f"assign_grad must be one of {', '.join(ASSIGN_GRADS)}, got {assign_grad!r}")
        self.num_groups, self.init_std = groups, init_std
        self.assign_grad, self.dense_weight_grad = assign_grad, bool(dense_weight_grad)
        factory = {"device": device, "dtype": dtype}
        self.in_assign = nn.Parameter(torch.empty(in_channels, groups, **factory), requires_grad=learn_assignments)
        self.out_assign = nn.Parameter(torch.empty(out_channels, groups, **factory), requires_grad=learn_assignments)
        if assign_grad == "gumbel":  # refreshed in place, outside forward (refresh_gumbel_noise); not checkpointed:
            # the noise of a step derives from the run's seed and the step alone
            self.register_buffer("gumbel_in", torch.zeros(in_channels, groups, **factory), persistent=False)
            self.register_buffer("gumbel_out", torch.zeros(out_channels, groups, **factory), persistent=False)
            self.register_buffer("gumbel_tau", torch.ones((), **factory), persistent=False)
        self.reset_assignments()

    @property
    def learn_assignments(self) -> bool:
        return self.in_assign.requires_grad

    def reset_assignments(self) -> None:
        """Draw both assignment-logit matrices from N(0, init_std^2); the reference uses N(0, 1)."""
        with torch.no_grad():
            self.in_assign.normal_(0.0, self.init_std)
            self.out_assign.normal_(0.0, self.init_std)

    def refresh_gumbel_noise(self, generator: torch.Generator | None, tau: float = 1.0) -> None:
        """New Gumbel(0, 1) noise drawn from ``generator`` (``None``: no noise) and temperature ``tau``,
        written into the layer's buffers in place, so compiled graphs and CUDA graphs see them."""
        if self.assign_grad != "gumbel":
            return
        with torch.no_grad():
            for noise in (self.gumbel_in, self.gumbel_out):
                if generator is None:
                    noise.zero_()
                else:  # -log(E), E ~ Exp(1), is Gumbel(0, 1)
                    noise.exponential_(generator=generator).log_().neg_()
            self.gumbel_tau.fill_(tau)

    def _rule(self, logits: Tensor) -> Tensor:
        """Group ids from (possibly noisy) logits: the argmax; balanced layers override it."""
        return group_ids(logits)

    def _membership(self, logits: Tensor, noise: Tensor | None) -> Tensor:
        """One-hot group membership (C x G) with the gradient of the layer's estimator."""
        if self.assign_grad == "reference":
            return straight_through(logits, self._rule(logits))
        if self.assign_grad == "gumbel" and self.training and noise is not None:
            noisy = logits + noise
            return straight_through_full(noisy, self._rule(noisy), torch.softmax(noisy / self.gumbel_tau, dim=1))
        return straight_through_full(logits, self._rule(logits))

    def connection_mask(self) -> Tensor:
        """``M = B_out @ B_in^T`` (C_out x C_in), 1 where filter and input share a group."""
        gumbel = self.assign_grad == "gumbel"
        b_in = self._membership(self.in_assign, self.gumbel_in if gumbel else None)
        b_out = self._membership(self.out_assign, self.gumbel_out if gumbel else None)
        return b_out @ b_in.t()

    def masked_weight(self) -> Tensor:
        mask = self.connection_mask()[:, :, None, None].to(self.weight.dtype)
        if self.dense_weight_grad:
            return _DenseWeightGrad.apply(self.weight, mask)
        return self.weight * mask

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.masked_weight(), self.bias)

    def input_groups(self) -> Tensor:
        """Current group id (0..G-1) of every input channel, shape ``(C_in,)`` (noise-free, every estimator)."""
        return self._rule(self.in_assign)

    def filter_groups(self) -> Tensor:
        """Current group id (0..G-1) of every filter (output channel), shape ``(C_out,)``."""
        return self._rule(self.out_assign)

    def group_sizes(self) -> tuple[Tensor, Tensor]:
        """Channels per group (inputs, filters), each of shape ``(G,)`` on the CPU; groups may be empty."""
        return (torch.bincount(self.input_groups().cpu(), minlength=self.num_groups),
                torch.bincount(self.filter_groups().cpu(), minlength=self.num_groups))

    def extra_repr(self) -> str:
        frozen = "" if self.learn_assignments else ", frozen"
        estimator = "" if self.assign_grad == "reference" else f", assign_grad={self.assign_grad}"
        dense = ", dense_weight_grad" if self.dense_weight_grad else ""
        return super().extra_repr() + f", learned_groups={self.num_groups}{frozen}{estimator}{dense}"


class BalancedFlgc2d(Flgc2d):
    """FLGC with equal group sizes (the constraint CondenseNet keeps and FLGC drops).

    Membership is still learned from the assignment logits, through the same straight-through
    gradient, but each side is split into ``G`` groups of exactly ``C / G`` channels by
    :func:`balanced_group_ids`, so ``G`` must divide both channel counts. Deployed, the layer is a
    standard grouped conv with its channel permutations folded into the neighbouring layers.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, *args, groups: int = 1, **kwargs) -> None:
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"balanced FLGC {in_channels}->{out_channels} needs both channel counts divisible "
                             f"by groups={groups}")
        super().__init__(in_channels, out_channels, kernel_size, *args, groups=groups, **kwargs)

    def _rule(self, logits: Tensor) -> Tensor:
        return balanced_group_ids(logits)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", balanced"
