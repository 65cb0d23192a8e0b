"""MobileNetV2 for 32x32 CIFAR inputs, exactly as REFERENCE.md section 2.

Only the projection ("pw-linear") 1x1 convs are grouped by default; ``group_expand``
and ``group_shortcut`` extend grouping to the expand and shortcut 1x1 convs.
"""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor, nn

from flgc_lightning.layers import ASSIGN_GRADS, AssignGrad, make_pointwise_conv

# (expand ratio t, channels c, repeats n, first stride s)
CIFAR_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def make_divisible(value: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
    """torchvision's ``_make_divisible``: round to a multiple of ``divisor``, never dropping >10 %."""
    min_value = min_value or divisor
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


def block_specs(width_mult: float = 1.0, settings: Sequence[Sequence[int]] = CIFAR_SETTINGS):
    """``(inp, oup, stride, expand_ratio)`` of every inverted-residual block, in order."""
    inp = make_divisible(32 * width_mult)
    for t, c, n, s in settings:
        oup = make_divisible(c * width_mult)
        for i in range(n):
            yield inp, oup, s if i == 0 else 1, t
            inp = oup


def groupable_convs(width_mult: float = 1.0, group_expand: bool = False, group_shortcut: bool = False,
                    settings: Sequence[Sequence[int]] = CIFAR_SETTINGS) -> list[tuple[str, int, int]]:
    """``(module name, in channels, out channels)`` of every 1x1 conv the config groups."""
    convs = []
    for index, (inp, oup, stride, t) in enumerate(block_specs(width_mult, settings)):
        block = f"features.{index + 1}"
        hidden = int(round(inp * t))
        if t != 1 and group_expand:
            convs.append((f"{block}.conv.0.0", inp, hidden))
        convs.append((f"{block}.conv.{2 if t != 1 else 1}.0", hidden, oup))
        if group_shortcut and stride == 1 and inp != oup:
            convs.append((f"{block}.shortcut.0", inp, oup))
    return convs


def conv_bn(conv: nn.Module, channels: int, relu6: bool) -> nn.Sequential:
    layers = [conv, nn.BatchNorm2d(channels)]
    if relu6:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """Expand (1x1, if t != 1) -> depthwise 3x3 -> projection 1x1 (+ residual at stride 1)."""

    def __init__(
        self, inp: int, oup: int, stride: int, expand_ratio: int, groups: int, use_flgc: bool,
        group_expand: bool = False, group_shortcut: bool = False, assignment: str = "learned",
        assign_init_std: float = 1.0, assign_grad: AssignGrad = "reference", dense_weight_grad: bool = False,
    ) -> None:
        super().__init__()
        hidden = int(round(inp * expand_ratio))

        def pointwise(cin: int, cout: int, grouped: bool) -> nn.Module:
            return make_pointwise_conv(cin, cout, groups if grouped else 1, use_flgc, assignment, assign_init_std,
                                       assign_grad, dense_weight_grad)

        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(conv_bn(pointwise(inp, hidden, group_expand), hidden, relu6=True))
        layers.append(conv_bn(nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), hidden, relu6=True))
        layers.append(conv_bn(pointwise(hidden, oup, True), oup, relu6=False))
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1
        self.shortcut: Optional[nn.Module] = None
        if self.use_residual and inp != oup:
            self.shortcut = conv_bn(pointwise(inp, oup, group_shortcut), oup, relu6=False)

    @property
    def projection(self) -> nn.Module:
        """The pw-linear conv (the layer FLGC is about)."""
        return self.conv[-1][0]

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        if not self.use_residual:
            return out
        return out + (x if self.shortcut is None else self.shortcut(x))


class MobileNetV2(nn.Module):
    """CIFAR MobileNetV2 (stride-1 stem, 32x32 input) with dense, grouped or FLGC 1x1 convs.

    Args:
        num_classes: size of the classifier output.
        groups: group count of the grouped convs (1 = dense).
        use_flgc: learnable groups (FLGC) instead of standard grouped conv when ``groups > 1``.
        width_mult: channel multiplier, rounded with :func:`make_divisible`.
        group_expand / group_shortcut: also group the expand / shortcut 1x1 convs.
        in_channels: image channels (3 for CIFAR).
        assignment: FLGC only: ``learned`` (the reference), ``frozen`` (random groups that never
            change: the control for learning) or ``balanced`` (learned, equal group sizes).
        assign_init_std: std of the N(0, std^2) assignment-logit init (reference 1.0).
        assign_grad: FLGC only: gradient through the group binarisation, ``reference`` (selected entry
            only), ``ste`` (whole softmax) or ``gumbel`` (Gumbel-softmax straight-through).
        dense_weight_grad: FLGC only: weights outside a filter's group get their (unmasked) gradient too.
        groups_from / groups_shuffle: FLGC only: a trained run's checkpoint whose learned groups this network
            retrains from scratch, frozen (optionally shuffled, group sizes kept): the controls that separate
            "which channels" from "how big the groups are". ``train.py`` copies the groups in at the start
            of a fresh run (:func:`flgc_lightning.assignments.transfer.transfer_groups`); afterwards they
            are in the weights, so rebuilding this network from a checkpoint never reads that file.
    """

    def __init__(
        self,
        num_classes: int = 10,
        groups: int = 1,
        use_flgc: bool = False,
        width_mult: float = 1.0,
        group_expand: bool = False,
        group_shortcut: bool = False,
        in_channels: int = 3,
        assignment: str = "learned",
        assign_init_std: float = 1.0,
        assign_grad: AssignGrad = "reference",
        dense_weight_grad: bool = False,
        settings: Sequence[Sequence[int]] = CIFAR_SETTINGS,
        groups_from: Optional[str] = None,
        groups_shuffle: bool = False,
    ) -> None:
        super().__init__()
        if assign_grad not in ASSIGN_GRADS:
            raise ValueError(f"assign_grad must be one of {', '.join(ASSIGN_GRADS)}, got {assign_grad!r}")
        if not isinstance(dense_weight_grad, bool):
            raise ValueError(f"dense_weight_grad must be a boolean, got {dense_weight_grad!r}")
        if groups_shuffle and not groups_from:
            raise ValueError("groups_shuffle=true needs groups_from (the checkpoint whose groups are shuffled)")
        if groups_from and (not use_flgc or groups == 1 or assignment == "balanced"):
            raise ValueError("groups_from needs FLGC layers (use_flgc=true, groups > 1, assignment learned or "
                             f"frozen); got use_flgc={use_flgc}, groups={groups}, assignment={assignment}")
        self.groups_from, self.groups_shuffle = groups_from, groups_shuffle
        if groups_from:
            assignment = "frozen"  # the transferred groups are trained as they are
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"groups must be a positive integer, got {groups!r}")
        if not width_mult > 0:
            raise ValueError(f"width_mult must be > 0, got {width_mult!r}")
        for name, value in (("num_classes", num_classes), ("in_channels", in_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.groups, self.use_flgc = groups, use_flgc
        stem = make_divisible(32 * width_mult)
        self.last_channels = make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [conv_bn(nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False), stem, relu6=True)]
        for inp, oup, stride, t in block_specs(width_mult, settings):
            features.append(InvertedResidual(inp, oup, stride, t, groups, use_flgc, group_expand, group_shortcut,
                                             assignment, assign_init_std, assign_grad, dense_weight_grad))
        features.append(conv_bn(nn.Conv2d(oup, self.last_channels, 1, bias=False), self.last_channels, relu6=True))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Linear(self.last_channels, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # includes Flgc2d; its assignment maps keep N(0, 1)
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        # Global average pool as a plain mean: ptflops then counts the network exactly as
        # the reference reports it (94.99 M MACs dense); an nn.AdaptiveAvgPool2d adds 20 k.
        return self.classifier(self.features(x).mean((2, 3)))
