"""MobileNetV2-CIFAR structure and the reference counts (REFERENCE.md section 2)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from flgc_lightning.layers import Flgc2d
from flgc_lightning.models import InvertedResidual, MobileNetV2
from flgc_lightning.utils.complexity import (complexity_summary, count_macs, count_parameters, format_millions,
                                             learned_connections)
from counts import macs_by_hand


# REFERENCE.md section 2 (ptflops 0.7.x, 3x32x32): params exactly and MACs exactly (README's counts), which the
# reference prints as 94.99 M and 62.62 M.
REFERENCE_DENSE = (2_295_834, 94_992_906, "94.99 M")
REFERENCE_GROUPED_8 = (1_453_034, 62_622_218, "62.62 M")


@pytest.mark.parametrize(
    "kwargs, reference",
    [
        (dict(groups=1), REFERENCE_DENSE),
        (dict(groups=8, use_flgc=False), REFERENCE_GROUPED_8),
        (dict(groups=1, use_flgc=True), REFERENCE_DENSE),  # one learned group is dense
    ],
)
def test_reference_counts(kwargs, reference):
    model = MobileNetV2(**kwargs)
    params, macs, printed = reference
    assert count_parameters(model) == params
    assert count_macs(model) == macs and format_millions(macs) == printed
    assert macs_by_hand(model) == macs  # the hand formulas of tests/counts.py reproduce the reference exactly


def test_flgc_training_form_counts():
    """Dense weight + two N x G assignment maps per projection (17 layers); it runs the dense convolution."""
    flgc, dense = MobileNetV2(groups=8, use_flgc=True), MobileNetV2(groups=1)
    maps = sum(m.in_channels * 8 + m.out_channels * 8 for m in flgc.modules() if isinstance(m, Flgc2d))
    assert count_parameters(flgc) == count_parameters(dense) + maps == 2_364_954  # the reference's 2,364,954
    assert count_macs(flgc) == count_macs(dense)


def test_flgc_nominal_macs_equal_standard_grouped_and_learned_macs_follow_groups():
    torch.manual_seed(0)
    flgc = MobileNetV2(groups=8, use_flgc=True)
    assert count_macs(flgc, flgc_cost="nominal") == 62_622_218
    # Learned cost by hand: sum over FLGC layers of sum_g |in_g||out_g| * H * W (1x1 kernels, no bias).
    sizes = {}
    hooks = [m.register_forward_hook(lambda mod, i, o: sizes.__setitem__(mod, o.shape[-2] * o.shape[-1]))
             for m in flgc.modules() if isinstance(m, Flgc2d)]
    flgc.eval()(torch.zeros(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    flgc_layers = [m for m in flgc.modules() if isinstance(m, Flgc2d)]
    by_hand = sum(learned_connections(m) * sizes[m] for m in flgc_layers)
    dense_proj = sum(m.in_channels * m.out_channels * sizes[m] for m in flgc_layers)
    assert count_macs(flgc, flgc_cost="learned") == 94_992_906 - dense_proj + by_hand == macs_by_hand(flgc, flgc_cost="learned")
    summary = complexity_summary(flgc)
    assert set(summary) == {"params", "macs", "macs_nominal", "macs_learned"}


def test_projection_convs_are_the_grouped_ones():
    model = MobileNetV2(groups=8, use_flgc=True)
    blocks = [m for m in model.modules() if isinstance(m, InvertedResidual)]
    assert len(blocks) == 17
    flgc = [m for m in model.modules() if isinstance(m, Flgc2d)]
    assert flgc == [b.projection for b in blocks]
    assert [(m.in_channels, m.out_channels) for m in flgc[:3]] == [(32, 16), (96, 24), (144, 24)]
    assert flgc[-1].in_channels == 960 and flgc[-1].out_channels == 320
    # Residual wiring: stride-2 blocks have none; channel-changing stride-1 blocks get a 1x1 conv + BN.
    assert [b.use_residual for b in blocks] == [True, True, True, False, True, True, False, True, True, True,
                                                True, True, True, False, True, True, True]
    assert [b.shortcut is not None for b in blocks].count(True) == 4


def test_grouping_expand_and_shortcut_too():
    model = MobileNetV2(groups=8, use_flgc=False, group_expand=True, group_shortcut=True)
    convs = [m for m in model.modules() if type(m) is nn.Conv2d and m.kernel_size == (1, 1)]
    grouped = [m for m in convs if m.groups == 8]
    assert len(grouped) == 17 + 16 + 4  # projections, expands (t != 1), shortcuts
    assert count_parameters(model) == 744_186 and count_macs(model) == 27_814_410
    flgc = MobileNetV2(groups=8, use_flgc=True, group_expand=True, group_shortcut=True)
    assert sum(isinstance(m, Flgc2d) for m in flgc.modules()) == 37


def test_standard_grouped_needs_divisible_channels():
    with pytest.raises(ValueError, match="divisible by groups=3"):
        MobileNetV2(groups=3, use_flgc=False)
    MobileNetV2(groups=3, use_flgc=True)  # FLGC takes any group count


def test_init_follows_reference():
    model = MobileNetV2(groups=4, use_flgc=True)
    bn = model.features[0][1]
    assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.equal(bn.bias, torch.zeros_like(bn.bias))
    assert torch.equal(model.classifier.bias, torch.zeros(10))
    assert 0.005 < model.classifier.weight.std().item() < 0.015
    conv = model.features[-1][0]  # 1x1 320->1280, kaiming fan_out: std = sqrt(2 / 1280)
    assert abs(conv.weight.std().item() / (2 / 1280) ** 0.5 - 1) < 0.05


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = MobileNetV2(groups=8, use_flgc=True)
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.arange(4))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.count_nonzero(p.grad) > 0, name  # both assignment maps included
    assert all(model.get_parameter(n).grad is not None for n, _ in model.named_parameters() if "assign" in n)


def test_width_multiplier_and_forward_shape():
    model = MobileNetV2(num_classes=100, groups=2, use_flgc=True, width_mult=0.5, in_channels=1)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 100)


@pytest.mark.parametrize("groups", [2, 4, 8])
def test_balanced_flgc_macs_against_independent_counts(groups):
    """Balanced groups are equal, so every cost view of a balanced network equals the standard grouped one,
    counted here by hand (projection convs: C_in * C_out / G per position) and by the deployed network.
    ptflops hooks by exact type; BalancedFlgc2d once counted 0 MACs (8.30 M at every G)."""
    from flgc_lightning.deploy import deploy_model, deployed_macs

    torch.manual_seed(groups)
    balanced = MobileNetV2(groups=groups, use_flgc=True, assignment="balanced", width_mult=0.25)
    dense = MobileNetV2(groups=1, width_mult=0.25)
    positions = {}
    projections = [b.projection for b in dense.modules() if isinstance(b, InvertedResidual)]
    hooks = [m.register_forward_hook(lambda mod, i, o: positions.__setitem__(mod, o.shape[-2] * o.shape[-1]))
             for m in projections]
    dense.eval()(torch.zeros(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    dense_total = count_macs(dense)
    projection_macs = sum(m.in_channels * m.out_channels * positions[m] for m in projections)
    by_hand = dense_total - projection_macs + projection_macs // groups
    assert dense_total == 11_087_882 and (dense_total - projection_macs, projection_macs) == (8_300_554, 2_787_328)
    assert count_macs(balanced, flgc_cost="nominal") == by_hand
    assert count_macs(balanced, flgc_cost="learned") == by_hand
    assert count_macs(balanced, flgc_cost="dense") == dense_total
    assert complexity_summary(balanced)["macs_learned"] == by_hand
    assert count_macs(MobileNetV2(groups=groups, use_flgc=False, width_mult=0.25)) == by_hand
    # The deployed networks (BN folded away, so a constant fewer MACs than the training form) agree too.
    folded_away = dense_total - deployed_macs(deploy_model(dense, kernel="blockdiag"))
    assert folded_away > 0
    assert deployed_macs(deploy_model(balanced, kernel="blockdiag")) == by_hand - folded_away


def test_every_flgc_layer_type_is_counted():
    """A new FLGC subclass is counted without registering it anywhere (the hook follows isinstance)."""

    class Renamed(Flgc2d):
        pass

    layer = Renamed(16, 24, 1, groups=4, bias=False)
    net = nn.Sequential(layer)
    in_sizes, out_sizes = layer.group_sizes()
    assert count_macs(net, (16, 8, 8), "learned") == int((in_sizes * out_sizes).sum()) * 64
    assert count_macs(net, (16, 8, 8), "nominal") == 16 * 24 * 64 // 4

