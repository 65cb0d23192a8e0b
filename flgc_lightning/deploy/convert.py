"""Trained MobileNetV2 (dense, standard grouped or FLGC) -> inference network.

Every ``conv -> BatchNorm`` pair becomes one conv with a bias; every FLGC layer becomes an
:class:`UnequalGroupConv2d` that computes only its learned groups. For an FLGC projection the
hidden channels (outputs of the expand conv and the depthwise conv, both channel-wise up to the
projection) are reordered so each input group is contiguous, and hidden channels whose group
has no filter are dropped: both are exact because nothing else reads those channels. Dense and
standard-grouped models go through the same folding and memory layout, so timings compare fairly.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flgc_lightning.deploy import native
from flgc_lightning.deploy.blocks import DeployedInvertedResidual
from flgc_lightning.deploy.fold import fold_bn_into_weight
from flgc_lightning.deploy.grouped import UnequalGroupConv2d
from flgc_lightning.errors import UserError
from flgc_lightning.layers import Flgc2d
from flgc_lightning.models.mobilenetv2 import InvertedResidual, MobileNetV2


class DeployError(UserError):
    pass


@dataclass
class FoldedConv:
    """A conv with BatchNorm folded in, kept as tensors until its channels are final."""

    template: nn.Conv2d
    weight: Tensor
    bias: Tensor
    in_groups: Tensor | None = None  # FLGC only
    out_groups: Tensor | None = None
    num_groups: int = 1

    @classmethod
    def from_conv_bn(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> "FoldedConv":
        weight, bias = fold_bn_into_weight(conv.weight.detach(), None if conv.bias is None else conv.bias.detach(), bn)
        if isinstance(conv, Flgc2d):
            return cls(conv, weight, bias, conv.input_groups().cpu(), conv.filter_groups().cpu(), conv.num_groups)
        return cls(conv, weight, bias)

    def keep_outputs(self, index: Tensor) -> None:
        """Keep (and reorder) output channels; a depthwise conv keeps the matching inputs too."""
        self.weight, self.bias = self.weight[index], self.bias[index]
        if self.out_groups is not None:
            self.out_groups = self.out_groups[index]

    def keep_inputs(self, index: Tensor) -> None:
        self.weight = self.weight[:, index]
        if self.in_groups is not None:
            self.in_groups = self.in_groups[index]

    def build(self, kernel: str = "blockdiag", relu6: bool = False, windows: bool = False) -> nn.Module:
        """The deployed conv; ``relu6`` is folded into unequal-group layers only (their kernel applies it);
        ``windows``: see :class:`UnequalGroupConv2d`."""
        if self.in_groups is not None:
            return UnequalGroupConv2d(self.weight, self.bias, self.in_groups, self.out_groups, self.num_groups, kernel,
                                      relu6, windows)
        t = self.template
        depthwise = t.groups > 1 and t.groups == t.in_channels == t.out_channels
        channels_out = self.weight.shape[0]
        groups = channels_out if depthwise else t.groups
        conv = nn.Conv2d(self.weight.shape[1] * groups, channels_out, t.kernel_size, t.stride, t.padding,
                         t.dilation, groups, bias=True, padding_mode=t.padding_mode)
        with torch.no_grad():
            conv.weight.copy_(self.weight)
            conv.bias.copy_(self.bias)
        return conv


def _stage(conv_bn: nn.Sequential) -> tuple[FoldedConv, bool]:
    """``(folded conv, has ReLU6)`` of one ``conv -> BN [-> ReLU6]`` Sequential."""
    conv, bn = conv_bn[0], conv_bn[1]
    if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d):
        raise DeployError(f"expected conv -> BatchNorm, found {type(conv).__name__} -> {type(bn).__name__}")
    return FoldedConv.from_conv_bn(conv, bn), len(conv_bn) > 2


def _sequential(folded: FoldedConv, relu6: bool, kernel: str = "blockdiag", windows: bool = False) -> nn.Sequential:
    """``conv [-> ReLU6]``; an unequal-group conv applies its ReLU6 itself (in the fused kernel's registers)."""
    conv = folded.build(kernel, relu6, windows)
    if relu6 and not isinstance(conv, UnequalGroupConv2d):
        return nn.Sequential(conv, nn.ReLU6(inplace=True))
    return nn.Sequential(conv)


def _group_hidden_channels(expand: FoldedConv, depthwise: FoldedConv, projection: FoldedConv, align: int = 1) -> None:
    """Order hidden channels by the projection's input group (by the expand conv's filter group first when that
    conv is FLGC too: it writes them, the projection reads them from the fused kernel's L1 buffer); drop those no
    filter reads, but keep the count a multiple of ``align`` (kept unread channels meet zero weights: exact)."""
    filters_per_group = torch.bincount(projection.out_groups, minlength=projection.num_groups)
    key = projection.in_groups
    if expand.out_groups is not None:  # FLGC expand (paper variant): its filter groups first, so each group's
        key = expand.out_groups * projection.num_groups + key  # outputs are consecutive (vector stores)
    order = torch.argsort(key, stable=True)
    read = filters_per_group[projection.in_groups[order]] > 0
    missing = -int(read.sum()) % align if align > 1 else 0
    if missing:  # keep the first unread channels too, up to the next multiple of align
        read[torch.nonzero(~read).flatten()[:missing]] = True
    kept = order[read]
    if len(kept) == 0:  # no group has both sides: the projection outputs its bias only
        kept = order[:1]
    expand.keep_outputs(kept)
    depthwise.keep_outputs(kept)
    projection.keep_inputs(kept)


def _group_block_inputs(producer: FoldedConv, depthwise: FoldedConv, projection: FoldedConv,
                        shortcut: FoldedConv | None) -> None:
    """A block without expand conv: order the *block input* channels by the projection's input
    group, through the conv that produces them (its only consumer is this block). Nothing is
    dropped: the shortcut conv, which absorbs the same order, reads every channel."""
    order = torch.argsort(projection.in_groups, stable=True)
    producer.keep_outputs(order)
    depthwise.keep_outputs(order)
    projection.keep_inputs(order)
    if shortcut is not None:
        shortcut.keep_inputs(order)


def _deploy_block(block: InvertedResidual, kernel: str, producer: FoldedConv | None = None,
                  align: int = 1) -> DeployedInvertedResidual:
    """Fold and build ``block``; ``producer``: the folded conv that alone feeds it, if any."""
    stages = [_stage(s) for s in block.conv]
    shortcut = None if block.shortcut is None else _stage(block.shortcut)
    projection = stages[-1][0]
    if projection.in_groups is not None:
        if len(stages) == 3:
            _group_hidden_channels(stages[0][0], stages[1][0], projection, align)
        elif producer is not None and (not block.use_residual or shortcut is not None):
            _group_block_inputs(producer, stages[0][0], projection, None if shortcut is None else shortcut[0])
    # an FLGC expand conv writes hidden channels in the order chosen above: its fused tasks take them 8 at a time
    conv = nn.Sequential(*(_sequential(f, relu, kernel, windows=len(stages) == 3 and i == 0)
                           for i, (f, relu) in enumerate(stages)))
    return DeployedInvertedResidual(conv, None if shortcut is None else _sequential(*shortcut, kernel),
                                    block.use_residual)


@torch.no_grad()
def deploy_model(model: nn.Module, channels_last: bool = True, kernel: str = "auto",
                 input_size: tuple[int, int, int] = (3, 32, 32), align_hidden: int = 1) -> nn.Module:
    """An eval-mode inference copy of ``model`` (on CPU) with BN folded and FLGC groups realised.

    ``kernel``: how FLGC layers run (:class:`UnequalGroupConv2d`): ``"fused"`` (compiled CPU
    kernel computing only the learned connections), ``"blockdiag"`` (dense conv, zeros outside groups; stock ops)
    or ``"auto"`` (per layer, whichever of the two is faster here on a batch of 64 ``input_size`` images).
    ``align_hidden``: keep each pruned hidden width a multiple of this (16 for the stock-op ONNX file: ONNX Runtime's
    fast NCHWc convs need channel counts that are multiples of its 8/16-float blocks, benchmarks/README.md). With ``kernel="fused"`` or
    ``"auto"`` the width is also a multiple of the fused kernel's 8-float vectors: a tail of a few channels runs
    the block kernel's scalar code, which took 16->86->24 at 32x32 from 4 to 9 ms at batch 64.
    """
    kernels = (*UnequalGroupConv2d.KERNELS, "auto")
    if kernel not in kernels:
        raise DeployError(f"kernel must be one of {', '.join(kernels)}; got {kernel!r}")
    if kernel == "fused":
        try:
            native.load_library()
        except native.NativeKernelUnavailable as err:
            raise DeployError(f"the fused kernel cannot be built here: {err}. Use kernel='blockdiag' or 'auto'.") from None
    if not isinstance(model, MobileNetV2):
        raise DeployError(f"deploy supports flgc_lightning MobileNetV2 networks, got {type(model).__name__}")
    if kernel in ("fused", "auto"):
        align_hidden = math.lcm(align_hidden, native.LANES)
    net = copy.deepcopy(model).cpu().float().eval()
    features = list(net.features)
    plain: dict[int, tuple[FoldedConv, bool]] = {}  # conv stages, built last: a block may reorder their outputs
    for i, layer in enumerate(features):
        if isinstance(layer, InvertedResidual):
            producer = plain[i - 1][0] if i - 1 in plain else None
            features[i] = _deploy_block(layer, "blockdiag" if kernel == "auto" else kernel, producer, align_hidden)
        else:
            plain[i] = _stage(layer)
    for i, stage in plain.items():
        features[i] = _sequential(*stage)
    net.features = nn.Sequential(*features)
    for p in net.parameters():
        p.requires_grad_(False)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    if kernel == "auto":
        from flgc_lightning.deploy.tune import choose_kernels

        choose_kernels(net, channels_last=channels_last, input_size=tuple(input_size))
    return net.eval()
