"""Deployed forms beyond eager PyTorch: torch.compile, torch.export (.pt2) and ONNX (dynamo exporter) of FLGC
networks with empty groups, both variants, checked against the trained network; no warnings on the way."""
from __future__ import annotations

import pytest
import torch

from flgc_lightning.deploy import compile_deployed, deploy_model, export_onnx, export_program
from flgc_lightning.layers import Flgc2d
from flgc_lightning.models import MobileNetV2
from test_deploy import VARIANTS, set_groups, trained_like


def model_with_empty_groups(variant: str) -> torch.nn.Module:
    """G=5, every FLGC layer with a group that has inputs only, one with filters only and one empty."""
    g = 5
    torch.manual_seed(5)
    model = MobileNetV2(groups=g, use_flgc=True, **VARIANTS[variant])
    for layer in (m for m in model.modules() if isinstance(m, Flgc2d)):
        n_in, n_out = layer.in_channels, layer.out_channels
        set_groups(layer, [0] * (n_in // 4) + [3 + i % 2 for i in range(n_in - n_in // 4)],
                   [1] * (n_out // 4) + [3 + i % 2 for i in range(n_out - n_out // 4)])
    return trained_like(model, 5)


@pytest.mark.slow
@pytest.mark.filterwarnings("error")  # deprecation (or any) warnings from the export path fail the test
@pytest.mark.parametrize("variant", VARIANTS)
def test_compiled_exported_and_onnx_forms_match_the_trained_network(variant, tmp_path):
    import onnx
    import onnxruntime

    model = model_with_empty_groups(variant)
    net = deploy_model(model, kernel="fused")
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    xc = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected = model(x)
        torch._dynamo.reset()
        compiled = compile_deployed(net)(xc)
    assert expected.abs().max() > 0.5
    assert (compiled - expected).abs().max() <= 1e-4

    program = export_program(net, tmp_path / "net.pt2")
    fused = [str(n.target) for n in program.graph.nodes if str(n.target).startswith("flgc.")]
    blocks = sum("inverted_residual_unequal_group" in t for t in fused)  # expand + projection, one op
    assert blocks == 16
    covered = len(fused) + (blocks if variant == "paper" else 0)  # paper variant: the expand conv is FLGC too
    assert covered == sum(isinstance(m, Flgc2d) for m in model.modules())  # every FLGC layer inside an op
    with torch.no_grad():
        reloaded = torch.export.load(str(tmp_path / "net.pt2")).module()(xc)  # batch 3; exported with batch 2
    assert (reloaded - expected).abs().max() <= 1e-4

    aligned = deploy_model(model, kernel="blockdiag", align_hidden=16)
    export_onnx(aligned, tmp_path / "net.onnx")
    graph = onnx.load(str(tmp_path / "net.onnx")).graph
    assert not {"Gather", "GatherElements"} & {n.op_type for n in graph.node}
    session = onnxruntime.InferenceSession(str(tmp_path / "net.onnx"), providers=["CPUExecutionProvider"])
    assert abs(session.run(None, {"images": x.numpy()})[0] - expected.numpy()).max() <= 1e-4
    widths = [b.conv[-2][0].out_channels for b in aligned.features if hasattr(b, "use_residual") and len(b.conv) == 3]
    assert all(w % 16 == 0 for w in widths)  # pruned hidden widths kept at ONNX Runtime's 16-channel blocks


@pytest.mark.slow
def test_compiled_graph_keeps_the_fused_ops_without_graph_breaks():
    from torch._dynamo.utils import counters

    model = model_with_empty_groups("paper")
    net = deploy_model(model, kernel="fused")
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    torch._dynamo.reset()
    counters.clear()
    explanation = torch._dynamo.explain(net)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    targets = [str(n.target) for g in explanation.graphs for n in g.graph.nodes]
    assert sum("flgc.inverted_residual_unequal_group" in t for t in targets) == 16  # every block with an expand
    assert sum("flgc.depthwise_unequal_group_conv" in t for t in targets) == 1  # the first block: dw + projection
