"""The fused kernel as one PyTorch custom op: ``torch.ops.flgc.fused_step(x, ints, floats, residual, out_channels,
stride)`` runs one step of :mod:`flgc_lightning.deploy.tables` (an unequal-group 1x1 conv, a depthwise conv feeding
one, or a whole inverted-residual block), its weights and tables the two tensors ``ints`` and ``floats``.

Registered with ``torch.library`` (with a fake implementation for shapes), so ``torch.compile`` keeps it as one
opaque node inside the compiled graph and ``torch.export`` writes it into ``.pt2`` programs. Importing this module
(``flgc_lightning.deploy`` does) registers the op; that is all a process needs to load such a program. The step is
checked (:func:`~flgc_lightning.deploy.tables.checked_step`) before any C code sees it, whoever calls the op.

Where the compiled kernel cannot be built (no C compiler) or the input is not a CPU float32 tensor, the op runs the
step with stock ops (:meth:`~flgc_lightning.deploy.tables.Step.reference`), so a program exported on one machine
gives the same numbers on another.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

from flgc_lightning.deploy import native
from flgc_lightning.deploy.tables import Step, TableError, checked_step

_warned = False


def apply(step: Step, x: Tensor, residual: Tensor | None = None) -> Tensor:
    """``step`` on ``x`` (N, C, H, W): the compiled kernel where it runs, else stock ops (one warning per process)."""
    global _warned
    residual = step.check_call(x, residual)
    if x.device.type == "cpu" and x.dtype == torch.float32:
        if native.available():
            return native.run(step, x, residual)
        if not _warned:
            _warned = True
            warnings.warn("fused unequal-group kernel unavailable (no working C compiler); running stock PyTorch ops "
                          "instead (block-diagonal dense convs, same numbers)", stacklevel=3)
    return step.reference(x, residual)


@torch.library.custom_op("flgc::fused_step", mutates_args=())
def fused_step(x: Tensor, ints: Tensor, floats: Tensor, residual: Tensor | None, out_channels: int,
               stride: int) -> Tensor:
    """One step (:func:`~flgc_lightning.deploy.tables.make_step`) on ``x``; ``out_channels`` and ``stride`` repeat the
    step's own (the traced graph's shapes come from them), and must agree with it."""
    step = checked_step(ints, floats)
    if (step.out_channels, step.stride) != (out_channels, stride):
        raise TableError(f"fused step: called for {out_channels} outputs at stride {stride}, its tables give "
                         f"{step.out_channels} at stride {step.stride}")
    return apply(step, x, residual)


@fused_step.register_fake
def _(x, ints, floats, residual, out_channels, stride):
    n, _, h, w = x.shape
    return torch.empty((n, out_channels, (h - 1) // stride + 1, (w - 1) // stride + 1), dtype=x.dtype,
                       device=x.device, memory_format=torch.channels_last)
