"""Balanced FLGC deploys exactly, at the cost of standard grouped convs, with its channel permutations folded in."""
from __future__ import annotations

import pytest
import torch

from flgc_lightning.deploy import UnequalGroupConv2d, deploy_model, deployed_macs
from flgc_lightning.layers import BalancedFlgc2d
from flgc_lightning.models import MobileNetV2


def trained_like(groups: int, **kwargs) -> MobileNetV2:
    """Balanced FLGC with moved assignments and non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(groups)
    net = MobileNetV2(groups=groups, use_flgc=True, assignment="balanced", **kwargs)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, BalancedFlgc2d):
                m.in_assign.normal_(0, 3)
                m.out_assign.normal_(0, 3)
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2)
                m.weight.normal_(1, 0.1)
                m.bias.normal_(0, 0.1)
    return net.eval()


@pytest.mark.parametrize("groups, kwargs", [(2, {}), (4, {}), (8, {}), (8, dict(group_expand=True, group_shortcut=True))])
def test_balanced_network_deploys_exactly_at_grouped_cost(groups, kwargs):
    net = trained_like(groups, **kwargs)
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    deployed = deploy_model(net, kernel="blockdiag")
    with torch.no_grad():
        diff = (deployed(images.contiguous(memory_format=torch.channels_last)) - net(images)).abs().max().item()
    assert diff <= 1e-4
    layers = [m for m in deployed.modules() if isinstance(m, UnequalGroupConv2d)]
    assert layers
    for layer in layers:  # G equal blocks: exactly a standard grouped conv's connections
        assert len(set(layer.in_sizes)) == 1 and len(set(layer.out_sizes)) == 1
        assert layer.learned_connections * groups == layer.in_channels * layer.out_channels
    if not kwargs:  # projections only (the reference model): each input order is folded into the expand /
        # depthwise convs (the stem for the first block), so every group's inputs are one run of channels
        assert all(torch.equal(m.in_groups, m.in_groups.sort().values) for m in layers)
    # cost: exactly that of the standard grouped network of the same G (real grouped convs, counted by ptflops)
    grouped = deploy_model(MobileNetV2(groups=groups, **kwargs).eval(), kernel="blockdiag")
    assert deployed_macs(deployed) == deployed_macs(grouped)


# The paper variant (FLGC expand and shortcut convs too) with -m exhaustive: the same forms, twice the layers.
@pytest.mark.parametrize("groups, kwargs", [(4, {}), pytest.param(4, dict(group_expand=True, group_shortcut=True),
                                                                  marks=pytest.mark.exhaustive)],
                         ids=["reference", "paper"])
def test_balanced_network_in_every_deployed_form(groups, kwargs, tmp_path):
    """The forms a user ships, not only the eager one: the fused kernel, the .pt2 program reloaded, the ONNX
    file with custom ops (fused) and the stock-op ONNX file (blockdiag), each against the trained network."""
    from flgc_lightning.deploy import export_onnx, export_program, load_program, onnxruntime_logits

    net = trained_like(groups, **kwargs)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = net(images)
    assert expected.abs().max() > 0.05  # BN-scaled logits: well above the 1e-4 the forms must agree to
    fused = deploy_model(net, kernel="fused")
    assert {m.kernel for m in fused.modules() if isinstance(m, UnequalGroupConv2d)} == {"fused"}
    channels_last = images.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert (fused(channels_last) - expected).abs().max() <= 1e-4
    export_program(fused, tmp_path / "net.pt2")
    with torch.no_grad():
        reloaded = load_program(tmp_path / "net.pt2")(channels_last)
    assert (reloaded - expected).abs().max() <= 1e-4
    export_onnx(fused, tmp_path / "fused.onnx")
    assert (onnxruntime_logits(tmp_path / "fused.onnx", images) - expected).abs().max() <= 1e-4
    export_onnx(deploy_model(net, kernel="blockdiag", align_hidden=16), tmp_path / "stock.onnx", kernel="blockdiag")
    assert (onnxruntime_logits(tmp_path / "stock.onnx", images) - expected).abs().max() <= 1e-4
