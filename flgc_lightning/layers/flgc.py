"""Fully Learnable Group Convolution (Wang et al., CVPR 2019), REFERENCE.md section 1.

The layer keeps a dense weight plus two assignment-logit matrices and, on every
forward pass, masks the weight so that a filter only sees the input channels of
its own (learned) group. Groups are unequal and may be empty on either side. Two controls share the layer:
frozen assignments (``learn_assignments=False``: the N(0, 1) draw stays, same unequal-group cost,
no learning) and :class:`BalancedFlgc2d` (learned membership, equal group sizes). How the gradient
crosses the binarisation (the reference's rule or ones that can learn more) lives in
:mod:`flgc_lightning.layers.estimators`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from flgc_lightning.layers.estimators import (
    ASSIGN_GRADS, AssignGrad, full_straight_through, gumbel_noise, gumbel_straight_through, mask_weight,
    straight_through,
)


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
    """Row-wise one-hot of ``argmax(softmax(logits))`` with the reference's straight-through gradient.

    Forward value is exactly the 0/1 one-hot (one group per row even on ties:
    ``torch.argmax`` returns the first maximal index). Backward passes
    ``grad_P = grad_B * B`` into the softmax, i.e. only the selected entry gets a
    gradient (:func:`~flgc_lightning.layers.estimators.straight_through`).
    """
    return straight_through(logits, torch.softmax(logits, dim=1).argmax(dim=1))


class Flgc2d(nn.Conv2d):
    """Drop-in ``nn.Conv2d`` whose input channels and filters learn their group.

    ``groups`` is the number of learned groups ``G`` (any positive integer; it need
    not divide the channel counts and may exceed them). The underlying convolution
    is dense (``nn.Conv2d.groups == 1``); the group count is stored as
    ``num_groups``. Subclassing ``nn.Conv2d`` keeps initialisers and
    ``isinstance`` checks working; FLOP counters need the hook in
    :mod:`flgc_lightning.utils.complexity` because they match types exactly.

    ``assign_grad`` picks the gradient through the binarisation (:mod:`~flgc_lightning.layers.estimators`):
    ``reference`` (the paper's repository), ``ste`` or ``gumbel``. A ``gumbel`` layer keeps its noise and
    temperature in non-persistent buffers that :meth:`refresh_gumbel_noise` / :meth:`set_gumbel_tau` fill
    outside ``forward`` (no host sync, no recompile; zero noise = none); in eval mode it uses no noise.
    ``dense_weight_grad``: the weight gets the unmasked gradient, so connections outside a filter's group
    keep training (forward values unchanged). Reported groups are always the noise-free ones.
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
        assign_grad: AssignGrad = "reference",
        dense_weight_grad: bool = False,
    ) -> None:
        if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
            raise ValueError(f"Flgc2d: groups must be a positive integer, got {groups!r}")
        if assign_grad not in ASSIGN_GRADS:
            raise ValueError(f"assign_grad must be one of {', '.join(ASSIGN_GRADS)}, got {assign_grad!r}")
        if not isinstance(dense_weight_grad, bool):
            raise ValueError(f"dense_weight_grad must be a boolean, got {dense_weight_grad!r}")
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation,
            groups=1, bias=bias, padding_mode=padding_mode, device=device, dtype=dtype,
        )
        if not init_std > 0:
            raise ValueError(f"assign_init_std must be > 0, got {init_std!r}")
        self.num_groups, self.init_std = groups, init_std
        self.assign_grad, self.dense_weight_grad = assign_grad, dense_weight_grad
        factory = {"device": device, "dtype": dtype}
        self.in_assign = nn.Parameter(torch.empty(in_channels, groups, **factory), requires_grad=learn_assignments)
        self.out_assign = nn.Parameter(torch.empty(out_channels, groups, **factory), requires_grad=learn_assignments)
        if assign_grad == "gumbel":  # not in checkpoints: drawn from (seed, step), so a resume redraws them
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

    @staticmethod
    def group_rule(logits: Tensor) -> Tensor:
        """Group id of every row of ``logits``: the argmax (:func:`group_ids`)."""
        return group_ids(logits)

    def _one_hot(self, logits: Tensor, noise: Optional[Tensor]) -> Tensor:
        """``B`` of one side, with this layer's estimator's gradient."""
        if self.assign_grad == "reference":
            return straight_through(logits, self.group_rule(logits))
        if self.assign_grad == "ste":
            return full_straight_through(logits, self.group_rule(logits))
        perturbed = logits + noise if self.training else logits
        return gumbel_straight_through(perturbed, self.group_rule(perturbed), self.gumbel_tau)

    def connection_mask(self) -> Tensor:
        """``M = B_out @ B_in^T`` (C_out x C_in), 1 where filter and input share a group."""
        gumbel = self.assign_grad == "gumbel"
        b_in = self._one_hot(self.in_assign, self.gumbel_in if gumbel else None)
        b_out = self._one_hot(self.out_assign, self.gumbel_out if gumbel else None)
        return b_out @ b_in.t()

    def masked_weight(self) -> Tensor:
        return mask_weight(self.weight, self.connection_mask()[:, :, None, None].to(self.weight.dtype),
                           self.dense_weight_grad)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.masked_weight(), self.bias)

    @torch.no_grad()
    def refresh_gumbel_noise(self, generator: Optional[torch.Generator]) -> None:
        """New Gumbel noise for both sides from ``generator`` (on this layer's device), or zero noise
        (none) for ``None``. A no-op unless ``assign_grad == "gumbel"``. Call it outside ``forward``."""
        if self.assign_grad != "gumbel":
            return
        for buffer in (self.gumbel_in, self.gumbel_out):
            if generator is None:
                buffer.zero_()
            else:
                buffer.copy_(gumbel_noise(buffer.shape, generator, buffer.dtype, buffer.device))

    @torch.no_grad()
    def set_gumbel_tau(self, tau: float) -> None:
        """The Gumbel-softmax temperature of the backward pass (a no-op unless ``assign_grad == "gumbel"``)."""
        if self.assign_grad == "gumbel":
            self.gumbel_tau.fill_(tau)

    def input_groups(self) -> Tensor:
        """Current group id (0..G-1) of every input channel, shape ``(C_in,)``; never includes noise."""
        return self.group_rule(self.in_assign)

    def filter_groups(self) -> Tensor:
        """Current group id (0..G-1) of every filter (output channel), shape ``(C_out,)``; never includes noise."""
        return self.group_rule(self.out_assign)

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

    Membership is still learned from the assignment logits, through the same estimators, but each
    side is split into ``G`` groups of exactly ``C / G`` channels by :func:`balanced_group_ids` (for
    ``gumbel``, of the perturbed logits), so ``G`` must divide both channel counts. Deployed, the layer is a
    standard grouped conv with its channel permutations folded into the neighbouring layers.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, *args, groups: int = 1, **kwargs) -> None:
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"balanced FLGC {in_channels}->{out_channels} needs both channel counts divisible "
                             f"by groups={groups}")
        super().__init__(in_channels, out_channels, kernel_size, *args, groups=groups, **kwargs)

    @staticmethod
    def group_rule(logits: Tensor) -> Tensor:
        """Group id of every row of ``logits``, equal group sizes (:func:`balanced_group_ids`)."""
        return balanced_group_ids(logits)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", balanced"
