"""How gradients cross FLGC's binarisation: the assignment one-hot and the weight mask.

Every estimator has the same forward value, a 0/1 one-hot of given group ids, and differs only in the
gradient it lets through (REFERENCE.md section 7 lists what the reference rule cannot learn):

- ``reference``: ``grad_P = grad_B * B``, only the selected entry, then the softmax (the paper's repo);
- ``ste``: ``grad_P = grad_B``, the whole row of the softmax (binarise in the forward pass only);
- ``gumbel``: like ``ste`` but through ``softmax((A + g) / tau)``, with the ids drawn from ``A + g``.

None uses a custom autograd function or an in-place edit: ``hard + (s - s.detach())`` equals ``hard``
bit for bit (x - x == 0) while its derivative is that of ``s``.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import Tensor

AssignGrad = Literal["reference", "ste", "gumbel"]
ASSIGN_GRADS: tuple[str, ...] = ("reference", "ste", "gumbel")


def one_hot(ids: Tensor, like: Tensor) -> Tensor:
    """Row-wise 0/1 one-hot of ``ids`` shaped and typed like ``like``.

    scatter, not F.one_hot: one_hot checks the ids' range on the host, a device sync per call on GPUs.
    """
    return torch.zeros_like(like).scatter_(1, ids[:, None], 1.0)


def straight_through(logits: Tensor, ids: Tensor) -> Tensor:
    """The reference: one-hot of ``ids`` in value; gradient ``grad_B * B`` into the row-wise softmax of ``logits``."""
    probs = torch.softmax(logits, dim=1)
    hard = one_hot(ids, probs)
    selected = probs * hard
    return hard + (selected - selected.detach())


def full_straight_through(logits: Tensor, ids: Tensor) -> Tensor:
    """One-hot of ``ids`` in value; the whole ``grad_B`` goes into the row-wise softmax of ``logits``."""
    probs = torch.softmax(logits, dim=1)
    return one_hot(ids, probs) + (probs - probs.detach())


def gumbel_straight_through(perturbed: Tensor, ids: Tensor, tau: Tensor) -> Tensor:
    """One-hot of ``ids`` (the caller's ids of the perturbed logits ``A + g``) in value; the gradient
    goes through ``softmax((A + g) / tau)``. ``tau`` is a 0-dim tensor, so changing it never recompiles."""
    soft = torch.softmax(perturbed / tau, dim=1)
    return one_hot(ids, soft) + (soft - soft.detach())


class _DenseGradMask(torch.autograd.Function):
    """``weight * mask`` whose weight gradient is not masked (the mask gradient is the usual one)."""

    @staticmethod
    def forward(ctx, weight: Tensor, mask: Tensor) -> Tensor:
        ctx.save_for_backward(weight)
        ctx.mask_shape = mask.shape
        return weight * mask

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        (weight,) = ctx.saved_tensors
        grad_mask = (grad * weight).sum_to_size(ctx.mask_shape) if ctx.needs_input_grad[1] else None
        return grad, grad_mask


def mask_weight(weight: Tensor, mask: Tensor, dense_grad: bool) -> Tensor:
    """``weight * mask`` (mask broadcast over the kernel); with ``dense_grad`` the weight receives the
    gradient of the masked weight unmasked, so connections outside a filter's group keep training."""
    if dense_grad:
        return _DenseGradMask.apply(weight, mask)
    return weight * mask


def gumbel_noise(shape: torch.Size, generator: torch.Generator, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Standard Gumbel samples ``-log(-log(u))`` with ``u`` uniform, kept off 0 and 1 so they are finite."""
    u = torch.rand(shape, generator=generator, dtype=torch.float32, device=device)
    tiny = torch.finfo(torch.float32).tiny
    u = u.clamp_(tiny, 1.0 - torch.finfo(torch.float32).eps)
    return (-torch.log(-torch.log(u))).to(dtype)
