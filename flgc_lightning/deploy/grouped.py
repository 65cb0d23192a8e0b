"""A 1x1 convolution whose channels form groups of unequal size.

No library layer runs unequal groups. The portable form (``kernel="padded"``) pads the learned
block-diagonal weight to ``G`` equal blocks of ``max_in x max_out`` and runs one standard grouped
``nn.Conv2d``:

    gather inputs -> grouped conv -> gather outputs

With ``kernel="blockdiag"`` the layer is instead one dense 1x1 conv whose weight is zero
outside the groups (no gathers, dense cost): on CPU it is faster for layers with large
feature maps and tiny groups, where oneDNN's grouped kernels gain nothing
(:func:`flgc_lightning.deploy.tune.choose_kernels` picks per layer by timing).
With ``kernel="fused"`` CPU inference runs :mod:`flgc_lightning.deploy.native`, a compiled kernel
that computes exactly the learned connections with no padding and no gathers, through the custom op
``torch.ops.flgc.unequal_group_conv1x1`` (:mod:`flgc_lightning.deploy.ops`), so ``torch.compile`` and
``torch.export`` keep it; the padded conv is kept too and runs where the op cannot (GPU, autograd, no
compiler in eager mode). The layer can also add a residual and apply ReLU6 in the same
pass over its output (``forward(x, residual)``, ``relu6=True``), which the fused kernel does in registers.

The input gather lays every group out as ``max_in`` consecutive channels (padding slots read
any valid channel and meet zero weights, so the result is exact); the output gather drops the
padding filters and puts the real ones back in the order the consumer expects. Filters of a
group without inputs output only their bias; inputs of a group without filters are never read.
The padded and block-diagonal forms are channel gathers and ``nn.Conv2d`` only, so ONNX
exports them as is.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from flgc_lightning.deploy import native, ops


def gather_channels(x: Tensor, index: Tensor) -> Tensor:
    """``x[:, index]`` that keeps a channels_last tensor channels_last, fast.

    On a channels_last tensor ``index_select(1)`` returns an NCHW tensor (the conv after it then
    takes the slow NCHW path) and ``index_select`` on the last dim is an element-wise loop;
    ``torch.gather`` over the ``(N*H*W, C)`` view with a broadcast index runs at copy speed
    (benchmarks/README.md). The branch is decided once, at trace/export time.
    """
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        n, c, h, w = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(n * h * w, c)
        picked = torch.gather(rows, 1, index.expand(n * h * w, index.numel()))
        return picked.view(n, h, w, index.numel()).permute(0, 3, 1, 2)
    return x.index_select(1, index)


class UnequalGroupConv2d(nn.Module):
    """``y = conv1x1(x)`` restricted to learned groups, with ``y`` in the original filter order.

    Args:
        weight: ``C_out x C_in`` (1x1) weight; only entries inside a group are used.
        bias: ``C_out`` bias (BatchNorm already folded in), or ``None``.
        in_groups: group id of every input channel (``C_in``).
        out_groups: group id of every filter (``C_out``).
        num_groups: ``G``; group ids lie in ``0..G-1`` (groups may be empty on either side).
        kernel: ``"padded"`` (grouped conv on equal padded blocks), ``"blockdiag"`` (dense, masked)
            or ``"fused"`` (compiled CPU kernel, learned connections only; padded elsewhere).
        relu6: apply ReLU6 to the output (after the residual, if one is given).
        windows: the fused kernel's tasks are consecutive output channels (:func:`native.pack`); the deploy
            step sets it for FLGC expand convs, whose output order it chooses.
    """

    KERNELS = ("padded", "blockdiag", "fused")

    def __init__(self, weight: Tensor, bias: Tensor | None, in_groups: Tensor, out_groups: Tensor, num_groups: int,
                 kernel: str = "padded", relu6: bool = False, windows: bool = False) -> None:
        super().__init__()
        self.relu6, self.windows = relu6, windows
        if kernel not in self.KERNELS:
            raise ValueError(f"kernel must be one of {self.KERNELS}, got {kernel!r}")
        self.kernel = kernel
        weight = weight.reshape(weight.shape[0], weight.shape[1])
        c_out, c_in = weight.shape
        in_groups, out_groups = in_groups.cpu().long(), out_groups.cpu().long()
        self.in_channels, self.out_channels, self.num_groups = c_in, c_out, num_groups
        self.in_sizes = torch.bincount(in_groups, minlength=num_groups).tolist()
        self.out_sizes = torch.bincount(out_groups, minlength=num_groups).tolist()
        max_in, max_out = max(max(self.in_sizes), 1), max(max(self.out_sizes), 1)
        if kernel == "blockdiag":
            max_in, max_out, num_groups_conv = c_in, c_out, 1
        else:
            num_groups_conv = num_groups

        in_index = torch.zeros(num_groups_conv * max_in, dtype=torch.long)  # padding reads channel 0
        out_slot = torch.empty(c_out, dtype=torch.long)
        padded = torch.zeros(num_groups_conv * max_out, max_in, dtype=weight.dtype)
        if kernel == "blockdiag":  # every channel stays in place; zero outside the groups
            same_group = out_groups[:, None] == in_groups[None, :]
            padded = torch.where(same_group, weight.cpu(), torch.zeros((), dtype=weight.dtype))
            in_index, out_slot = torch.arange(c_in), torch.arange(c_out)
        for g in range(0 if kernel == "blockdiag" else num_groups):
            members_in = torch.nonzero(in_groups == g).flatten()
            members_out = torch.nonzero(out_groups == g).flatten()
            in_index[g * max_in: g * max_in + len(members_in)] = members_in
            slots = g * max_out + torch.arange(len(members_out))
            out_slot[members_out] = slots
            if len(members_in) and len(members_out):
                padded[slots[:, None], torch.arange(len(members_in))[None, :]] = weight[members_out][:, members_in].cpu()
        self.conv = nn.Conv2d(num_groups_conv * max_in, num_groups_conv * max_out, 1, groups=num_groups_conv,
                              bias=bias is not None)
        with torch.no_grad():
            self.conv.weight.copy_(padded[:, :, None, None])
            if bias is not None:
                full_bias = torch.zeros(num_groups_conv * max_out, dtype=weight.dtype)
                full_bias[out_slot] = bias.cpu()
                self.conv.bias.copy_(full_bias)
        self.conv.to(weight.device)
        identity_in = num_groups_conv * max_in == c_in and torch.equal(in_index, torch.arange(c_in))
        identity_out = num_groups_conv * max_out == c_out and torch.equal(out_slot, torch.arange(c_out))
        self.gather_inputs, self.gather_outputs = not identity_in, not identity_out
        self.max_in, self.max_out = max_in, max_out
        self.register_buffer("in_groups", in_groups.to(weight.device), persistent=False)
        self.register_buffer("out_groups", out_groups.to(weight.device), persistent=False)
        self.register_buffer("in_index", in_index.to(weight.device), persistent=False)
        self.register_buffer("out_index", out_slot.to(weight.device), persistent=False)
        if kernel == "fused":
            _ = self.fused_tables  # build now, not on the first call

    @property
    def fused_tables(self) -> dict[str, Tensor]:
        """The fused kernel's tables, derived from ``conv`` and rebuilt whenever its weight or bias
        changed (``load_state_dict``, in-place edits), so every kernel always applies the same weights."""
        w, b = self.conv.weight, self.conv.bias
        key = (w.data_ptr(), w._version, w.dtype, None if b is None else (b.data_ptr(), b._version))
        if self.__dict__.get("_tables_key") != key:
            bias = None if b is None else b.detach()[self.out_index].cpu()
            dense = self.dense_weight().cpu().float()
            tables = native.pack(dense, bias, self.in_groups, self.out_groups, self.num_groups,
                                 getattr(self, "windows", False))  # modules pickled before the option: False
            tables["dense_weight"] = dense
            tables["dense_bias"] = torch.zeros(self.out_channels) if bias is None else bias.float()
            self._tables = tables
            self._tables_key = key
        return self._tables

    def op_tables(self) -> dict[str, Tensor]:
        """:attr:`fused_tables` for the custom op; inside ``torch.compile`` / ``torch.export`` tracing the
        tables built by the last eager access (:func:`refresh_tables` before tracing)."""
        if torch.compiler.is_compiling():
            return self._tables
        return self.fused_tables

    @property
    def learned_connections(self) -> int:
        """``sum_g |in_g| * |out_g|``: the multiply-adds per output position that the groups need."""
        return sum(i * o for i, o in zip(self.in_sizes, self.out_sizes))

    @torch.no_grad()
    def dense_weight(self) -> Tensor:
        """The ``C_out x C_in`` weight this layer applies (zero between different groups)."""
        if self.kernel == "blockdiag":
            return self.conv.weight[:, :, 0, 0].clone()
        weight = self.conv.weight.new_zeros(self.out_channels, self.in_channels)
        for o in range(self.out_channels):
            slot = int(self.out_index[o])
            g = slot // self.max_out
            n = self.in_sizes[g]
            weight[o, self.in_index[g * self.max_in: g * self.max_in + n]] = self.conv.weight[slot, :n, 0, 0]
        return weight

    def rebuilt(self, kernel: str) -> "UnequalGroupConv2d":
        """The same layer (same outputs) with another kernel."""
        bias = None if self.conv.bias is None else self.conv.bias[self.out_index]
        return UnequalGroupConv2d(self.dense_weight(), bias, self.in_groups, self.out_groups, self.num_groups, kernel,
                                  self.relu6, getattr(self, "windows", False))

    @property
    def executed_connections(self) -> int:
        """Multiply-adds per output position the chosen kernel really runs (padding / zeros included).

        The fused kernel runs one 8- or 16-lane FMA per input a task reads, so only vector lanes are padded.
        """
        if self.kernel == "fused":
            t = self.fused_tables  # pack() writes each task's segments right after the previous task's
            return int((t["segments"][:, 1] * native.task_lanes(t).repeat_interleave(t["tasks"][:, 1])).sum())
        return self.conv.weight.numel()

    @property
    def executed_outputs(self) -> int:
        """Output channels the chosen kernel computes per position (each gets a bias add); for the
        fused kernel, 8 or 16 lanes per task (small groups share a task)."""
        if self.kernel == "fused":
            return int(native.task_lanes(self.fused_tables).sum())
        return self.conv.out_channels

    def _fused_applies(self, x: Tensor, channels: int | None = None) -> bool:
        """The fused kernel can run on ``x`` (``channels``: its expected channel count, default this layer's;
        the block kernel passes the block input's)."""
        channels = self.in_channels if channels is None else channels
        if (self.kernel != "fused" or torch.jit.is_tracing() or torch.jit.is_scripting() or x.device.type != "cpu"
                or x.dtype != torch.float32 or self.conv.weight.dtype != torch.float32
                or x.dim() != 4 or x.shape[1] != channels  # else the padded path raises the error
                or (x.requires_grad and torch.is_grad_enabled())):
            return False
        if torch.compiler.is_compiling():  # the op itself falls back where the kernel cannot be built
            return True
        if not native.available():
            if not getattr(UnequalGroupConv2d, "_warned_unavailable", False):
                UnequalGroupConv2d._warned_unavailable = True
                warnings.warn("fused unequal-group kernel unavailable (no working C compiler); "
                              "running the padded grouped conv instead", stacklevel=3)
            return False
        return True

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """``act(conv(x) [+ residual])``; ``residual`` has the output's shape."""
        if self._fused_applies(x) and (residual is None or residual.dtype == torch.float32):
            t = self.op_tables()
            return ops.unequal_group_conv1x1(x, t["weight"], t["bias"], t["tasks"], t["segments"], t["out_index"],
                                             t["dense_weight"], t["dense_bias"], residual, self.relu6)
        if self.gather_inputs:
            x = gather_channels(x, self.in_index)
        y = self.conv(x)
        if self.gather_outputs:
            y = gather_channels(y, self.out_index)
        if residual is not None:
            y = y + residual
        if self.relu6:
            y = torch.clamp(y, 0.0, 6.0)
        return y

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel={self.kernel}, in_sizes={self.in_sizes}, "
                f"out_sizes={self.out_sizes}" + (", relu6=True" if self.relu6 else ""))


def refresh_tables(model: nn.Module) -> None:
    """Bring every fused layer's kernel tables up to date with its weights (call before tracing)."""
    for m in model.modules():
        if isinstance(m, UnequalGroupConv2d) and m.kernel == "fused":
            _ = m.fused_tables
        elif hasattr(m, "prepare"):  # deployed blocks: cached depthwise taps of the fused depthwise kernel
            m.prepare()


def replace_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` where ``root.get_submodule(name)`` is."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)
