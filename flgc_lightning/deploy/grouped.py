"""A 1x1 convolution whose channels form groups of unequal size.

No library layer runs unequal groups. The layer stores its weights once, as a dense 1x1 conv that is zero between
different groups (block-diagonal up to channel order), with the group of every channel. It runs either

- ``kernel="blockdiag"``: that conv as it is (stock ops, dense cost; runs anywhere, exports to stock ONNX), or
- ``kernel="fused"``: on CPU, the compiled kernel of :mod:`flgc_lightning.deploy.native`, which computes exactly the
  learned connections with no padding and no gathers, through the custom op ``torch.ops.flgc.fused_step``
  (:mod:`flgc_lightning.deploy.ops`), so ``torch.compile`` and ``torch.export`` keep it. Its tables
  (:func:`flgc_lightning.deploy.tables.pack`) are derived from the stored weight and rebuilt when it changes.
  Elsewhere (GPU, autograd, no C compiler in eager mode) the layer runs its block-diagonal conv.

The layer can also add a residual and apply ReLU6 in the same pass over its output (``forward(x, residual)``,
``relu6=True``), which the fused kernel does in registers. Filters of a group without inputs output only their
bias; inputs of a group without filters are never read.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import Tensor, nn

from flgc_lightning.deploy import native, tables


CACHE = "_derived_"  # attribute prefix of values derived from a module's weights


def cached(owner: nn.Module, name: str, sources: list[Tensor | None], build: Callable[[], object],
           settings: Callable[[], tuple] = tuple) -> object:
    """``build()``, kept on ``owner`` until one of ``sources`` is replaced or changed in place (``load_state_dict``,
    in-place edits) or ``settings()`` change (called only outside tracing); inside ``torch.compile`` /
    ``torch.export`` tracing the value built by the last eager call (:func:`refresh_tables` before tracing).
    Inference tensors keep no version count: an edit of one inside inference mode is not seen (the op checks
    whatever it is given, so this can never be unsafe)."""
    name = CACHE + name
    if torch.compiler.is_compiling():
        if name not in owner.__dict__:
            raise RuntimeError("fused steps are built before tracing: call flgc_lightning.deploy.refresh_tables(model) "
                               "before torch.compile / torch.export (compile_deployed and export_* do)")
        return owner.__dict__[name]
    # a new tensor changes the id, an in-place edit the version, ``.data =`` (``.to``, ``.double``) the data pointer
    key = settings() + tuple(None if t is None else (id(t), t.data_ptr(), -1 if t.is_inference() else t._version)
                             for t in sources)
    if owner.__dict__.get(name + "_key") != key:
        owner.__dict__[name], owner.__dict__[name + "_key"] = build(), key
    return owner.__dict__[name]


class DerivedState(nn.Module):
    """A module whose :func:`cached` values are derived, not stored: ``torch.save`` and ``copy.deepcopy`` leave them
    out (a saved network holds each weight once) and they are rebuilt on first use."""

    def __getstate__(self):
        return {k: v for k, v in super().__getstate__().items() if not k.startswith(CACHE)}


def fused_input(x: Tensor) -> bool:
    """``x`` is an input the fused kernel takes (else the stock-op form runs): CPU float32, 4-d, no autograd."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
            and not (x.requires_grad and torch.is_grad_enabled()) and not torch.jit.is_tracing())


def kernel_available() -> bool:
    """In eager mode, whether the compiled kernel runs here (one warning per process when not); inside
    ``torch.compile`` tracing always true: the op itself falls back to stock ops."""
    if torch.compiler.is_compiling() or native.available():
        return True
    if not getattr(kernel_available, "warned", False):
        kernel_available.warned = True
        warnings.warn("fused unequal-group kernel unavailable (no working C compiler); running the block-diagonal "
                      "dense conv instead (same numbers)", stacklevel=3)
    return False


class UnequalGroupConv2d(DerivedState):
    """``y = conv1x1(x)`` restricted to learned groups, with ``y`` in the original filter order.

    Args:
        weight: ``C_out x C_in`` (1x1) weight; only entries inside a group are kept.
        bias: ``C_out`` bias (BatchNorm already folded in), or ``None``.
        in_groups: group id of every input channel (``C_in``).
        out_groups: group id of every filter (``C_out``).
        num_groups: ``G``; group ids lie in ``0..G-1`` (groups may be empty on either side).
        kernel: ``"blockdiag"`` (dense conv, zero between groups) or ``"fused"`` (compiled CPU kernel, learned
            connections only; blockdiag elsewhere). Both apply the same stored weights; switching is setting it.
        relu6: apply ReLU6 to the output (after the residual, if one is given).
        windows: the fused kernel's tasks are consecutive output channels (:func:`tables.pack`); the deploy
            step sets it for FLGC expand convs, whose output order it chooses.
    """

    KERNELS = ("blockdiag", "fused")

    def __init__(self, weight: Tensor, bias: Tensor | None, in_groups: Tensor, out_groups: Tensor, num_groups: int,
                 kernel: str = "blockdiag", relu6: bool = False, windows: bool = False) -> None:
        super().__init__()
        if kernel not in self.KERNELS:
            raise ValueError(f"kernel must be one of {self.KERNELS}, got {kernel!r}")
        self.kernel, self.relu6, self.windows, self.num_groups = kernel, relu6, windows, num_groups
        weight = weight.detach().reshape(weight.shape[0], weight.shape[1])
        self.out_channels, self.in_channels = weight.shape
        in_groups, out_groups = in_groups.cpu().long(), out_groups.cpu().long()
        self.in_sizes = torch.bincount(in_groups, minlength=num_groups).tolist()
        self.out_sizes = torch.bincount(out_groups, minlength=num_groups).tolist()
        same_group = (out_groups[:, None] == in_groups[None, :]).to(weight.device)
        self.conv = nn.Conv2d(self.in_channels, self.out_channels, 1, bias=bias is not None, device=weight.device,
                              dtype=weight.dtype)
        with torch.no_grad():
            self.conv.weight.copy_(torch.where(same_group, weight, 0.0)[:, :, None, None])
            if bias is not None:
                self.conv.bias.copy_(bias)
        self.register_buffer("in_groups", in_groups.to(weight.device), persistent=False)
        self.register_buffer("out_groups", out_groups.to(weight.device), persistent=False)
        if kernel == "fused":
            self.prepare()  # build the tables now, not on the first call

    def __setstate__(self, state: dict) -> None:
        if "in_index" in state.get("_buffers", {}):  # the padded layout of earlier versions: its conv is not ours
            raise RuntimeError("this deployed network was saved by an older flgc_lightning (padded unequal-group "
                               "layers); deploy the checkpoint again with python -m flgc_lightning.deploy")
        super().__setstate__(state)

    def sources(self) -> list[Tensor | None]:
        """What the tables are derived from (with :meth:`settings`)."""
        return [self.conv.weight, self.conv.bias, self.in_groups, self.out_groups]

    def settings(self) -> tuple:
        return self.windows, native.preferred_lanes()

    def tables(self) -> dict[str, Tensor]:
        """The fused kernel's tables (:func:`tables.pack`) of the stored weights."""
        return cached(self, "tables", self.sources(),
                      lambda: tables.pack(self.dense_weight().cpu().float(),
                                          None if self.conv.bias is None else self.conv.bias.detach().cpu(),
                                          self.in_groups, self.out_groups, self.num_groups, self.windows),
                      self.settings)

    def step(self) -> tuple[Tensor, Tensor]:
        """This layer alone as a fused step (:func:`tables.make_step`)."""
        return cached(self, "step", self.sources(), lambda: tables.make_step(
            self.tables(), self.in_channels, self.out_channels, self.relu6), lambda: (*self.settings(), self.relu6))

    def prepare(self) -> None:
        """Build the tables and the step now (before ``torch.compile`` / ``torch.export`` trace the layer)."""
        self.step()

    @torch.no_grad()
    def dense_weight(self) -> Tensor:
        """The ``C_out x C_in`` weight this layer applies (zero between different groups)."""
        return self.conv.weight[:, :, 0, 0].clone()

    @property
    def learned_connections(self) -> int:
        """``sum_g |in_g| * |out_g|``: the multiply-adds per output position that the groups need."""
        return sum(i * o for i, o in zip(self.in_sizes, self.out_sizes))

    @property
    def executed_connections(self) -> int:
        """Multiply-adds per output position the chosen kernel really runs (zeros and unused lanes included).

        The fused kernel runs one 8- or 16-lane FMA per input a task reads, so only vector lanes are padded.
        """
        if self.kernel == "fused":
            t = self.tables()  # pack() writes each task's segments right after the previous task's
            return int((t["segments"][:, 1] * tables.task_lanes(t).repeat_interleave(t["tasks"][:, 1])).sum())
        return self.in_channels * self.out_channels

    @property
    def executed_outputs(self) -> int:
        """Output channels the chosen kernel computes per position (each gets a bias add); for the
        fused kernel, 8 or 16 lanes per task (small groups share a task)."""
        if self.kernel == "fused":
            return int(tables.task_lanes(self.tables()).sum())
        return self.out_channels

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """``act(conv(x) [+ residual])``; ``residual`` has the output's shape."""
        if (self.kernel == "fused" and fused_input(x) and x.shape[1] == self.in_channels
                and (residual is None or residual.dtype == torch.float32) and kernel_available()):
            ints, floats = self.step()
            return torch.ops.flgc.fused_step(x, ints, floats, residual, self.out_channels, 1)
        y = self.conv(x)
        if residual is not None:
            y = y + residual
        return torch.clamp(y, 0.0, 6.0) if self.relu6 else y

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel={self.kernel}, in_sizes={self.in_sizes}, "
                f"out_sizes={self.out_sizes}" + (", relu6=True" if self.relu6 else ""))


def refresh_tables(model: nn.Module) -> None:
    """Bring every fused layer's and block's kernel step up to date with its weights (call before tracing)."""
    for m in model.modules():
        if hasattr(m, "prepare") and getattr(m, "kernel", "fused") == "fused":
            m.prepare()
