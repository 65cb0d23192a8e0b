"""Deployed forms beyond eager PyTorch: torch.compile, torch.export (.pt2) and ONNX (dynamo exporter) of FLGC
networks with empty groups, both variants, checked against the trained network; no warnings on the way."""
from __future__ import annotations

import warnings

import pytest
import torch

from flgc_lightning.deploy import compile_deployed, deploy_model, export_onnx, export_program, load_program, tables
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


@pytest.fixture(scope="module")
def empty_groups(tmp_path_factory):
    """Per variant, made once for the module: the G=5 network with empty groups, its fused deployed network and
    that network's ONNX file (custom ops). Tests that change a network deploy their own."""
    made = {}

    def get(variant: str):
        if variant not in made:
            model = model_with_empty_groups(variant)
            net = deploy_model(model, kernel="fused")
            path = tmp_path_factory.mktemp(variant) / "fused.onnx"
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # deprecation (or any) warnings from the export path fail
                export_onnx(net, path)
            made[variant] = model, net, path
        return made[variant]

    return get


@pytest.mark.slow
@pytest.mark.filterwarnings("error")  # deprecation (or any) warnings from the export path fail the test
@pytest.mark.parametrize("variant", VARIANTS)
def test_compiled_exported_and_onnx_forms_match_the_trained_network(variant, tmp_path, empty_groups):
    import onnx
    import onnxruntime

    model, net, fused_onnx = empty_groups(variant)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    xc = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected = model(x)
        torch._dynamo.reset()
        compiled = compile_deployed(net)(xc)
    assert expected.abs().max() > 0.5
    assert (compiled - expected).abs().max() <= 1e-4

    program = export_program(net, tmp_path / "net.pt2")
    kinds = program_step_kinds(program)
    assert kinds.count(tables.BLOCK) == 16 and kinds.count(tables.DEPTHWISE) == 1  # a block: expand + projection
    covered = len(kinds) + (16 if variant == "paper" else 0)  # paper variant: the expand conv is FLGC too
    assert covered == sum(isinstance(m, Flgc2d) for m in model.modules())  # every FLGC layer inside an op
    with torch.no_grad():
        reloaded = load_program(tmp_path / "net.pt2")(xc)  # batch 3; exported with batch 2
    assert (reloaded - expected).abs().max() <= 1e-4

    check_fused_onnx(fused_onnx, x, expected)

    aligned = deploy_model(model, kernel="blockdiag", align_hidden=16)
    export_onnx(aligned, tmp_path / "net.onnx", kernel="blockdiag")
    graph = onnx.load(str(tmp_path / "net.onnx")).graph
    assert not {"Gather", "GatherElements"} & {n.op_type for n in graph.node}
    session = onnxruntime.InferenceSession(str(tmp_path / "net.onnx"), providers=["CPUExecutionProvider"])
    assert abs(session.run(None, {"images": x.numpy()})[0] - expected.numpy()).max() <= 1e-4
    widths = [b.conv[-2][0].out_channels for b in aligned.features if hasattr(b, "use_residual") and len(b.conv) == 3]
    assert all(w % 16 == 0 for w in widths)  # pruned hidden widths kept at ONNX Runtime's 16-channel blocks


def program_step_kinds(program: torch.export.ExportedProgram) -> list[int]:
    """The kind of every ``flgc.fused_step`` node of a ``.pt2`` program, read from its ``ints`` constant."""
    constants = program.graph_signature.inputs_to_lifted_tensor_constants
    return [int(program.constants[constants[n.args[1].name]][0]) for n in program.graph.nodes
            if str(n.target).startswith("flgc.fused_step")]


def onnx_step_kinds(model) -> list[int]:
    """The kind of every ``FlgcStep`` node of an ONNX model, read from its ``ints`` initializer."""
    from onnx import numpy_helper

    from flgc_lightning.deploy.onnx_custom_ops import custom_nodes

    stored = {t.name: t for t in model.graph.initializer}
    return [int(numpy_helper.to_array(stored[n.input[2]])[0]) for n in custom_nodes(model)]


def check_fused_onnx(path, x, expected):
    """The fused ONNX file: every fused block one custom node, activations channels-last between them (two
    transposes: after the stem conv, after the head conv, a custom op too), exact through the session helper (all custom nodes as one
    chain) and through a plain session with the custom-op library registered (each node with its weights).
    ``expected``: the trained network's logits of ``x``."""
    import numpy as np
    import onnx
    import onnxruntime
    from onnxruntime_extensions import get_library_path

    from flgc_lightning.deploy import onnxruntime_ops, onnxruntime_session
    from flgc_lightning.deploy.onnx_custom_ops import custom_nodes

    model = onnx.load(str(path))
    kinds = onnx_step_kinds(model)
    assert kinds.count(tables.BLOCK) == 16 and kinds.count(tables.DEPTHWISE) == 1
    assert model.graph.node[-3].op_type == "Transpose" and custom_nodes(model)[-1].output[0] == model.graph.node[-3].input[0]
    assert [n.op_type for n in model.graph.node].count("Transpose") == 2
    assert not {"Gather", "GatherElements"} & {n.op_type for n in model.graph.node}
    rewritten = onnx.load(str(path))
    onnxruntime_ops._forget(onnxruntime_ops._with_cached_weights(rewritten))
    kinds = [n.op_type for n in rewritten.graph.node if n.domain == "ai.onnx.contrib"]
    assert kinds == ["FlgcChainCached"]  # what the helper's session runs: one call for all blocks
    session = onnxruntime_session(path)
    assert abs(session.run(None, {"images": x.numpy()})[0] - expected.numpy()).max() <= 1e-4
    # batch 1 (threads share each image, small layers split their tasks), then more input shapes than the chain
    # keeps buffers for (4), then batch 1 again; and one kernel thread. Against the trained network: in eval mode
    # each image's logits do not depend on the batch, so the first n of x repeated have these logits.
    images, logits = np.concatenate([x.numpy()] * 2), np.concatenate([expected.numpy()] * 2)
    for n in (1, 2, 1, 3, 4, 5, 1):
        got = session.run(None, {"images": images[:n]})[0]
        assert abs(got - logits[:n]).max() <= 1e-4, n
    one = onnxruntime_session(path, threads=1)
    assert abs(one.run(None, {"images": x.numpy()})[0] - expected.numpy()).max() <= 1e-4
    options = onnxruntime.SessionOptions()
    options.register_custom_ops_library(get_library_path())
    plain = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    assert abs(plain.run(None, {"images": x.numpy()})[0] - expected.numpy()).max() <= 1e-4


@pytest.mark.slow
def test_compiled_graph_keeps_the_fused_ops_without_graph_breaks(empty_groups):
    from torch._dynamo.utils import counters

    _, net, _ = empty_groups("paper")
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    torch._dynamo.reset()
    counters.clear()
    explanation = torch._dynamo.explain(net)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    targets = [str(n.target) for g in explanation.graphs for n in g.graph.nodes]
    # one op per block (16 with an expand conv, the first without), one per FLGC shortcut conv (4)
    assert sum("flgc.fused_step" in t for t in targets) == 17 + 4


def test_fused_onnx_without_the_compiled_kernel_gives_the_same_numbers(monkeypatch, empty_groups):
    """No C compiler where the file runs: every custom op falls back to stock torch ops (weights unpacked from the
    kernel's tables), same logits; G=5 with empty groups, paper variant (FLGC expand convs too)."""
    import onnx

    from flgc_lightning.deploy import native, onnxruntime_session, ops

    model, net, path = empty_groups("paper")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        expected = model(x)
    assert len(onnx.load(str(path)).graph.node) < 30  # custom ops, not the stock-op form
    fast = onnxruntime_session(path).run(None, {"images": x.numpy()})[0]
    monkeypatch.setattr(native, "available", lambda: False)
    monkeypatch.setattr(ops, "_warned", False)
    with pytest.warns(UserWarning, match="running stock PyTorch ops instead"):
        slow = onnxruntime_session(path).run(None, {"images": x.numpy()})[0]
    assert expected.abs().max() > 0.5
    assert abs(fast - expected.numpy()).max() <= 1e-4 and abs(slow - expected.numpy()).max() <= 1e-4
    layer = next(m for m in net.modules() if getattr(m, "kernel", None) == "fused")
    weight, bias = tables.unpack(layer.tables(), layer.in_channels)  # the tables hold exactly the layer's weights
    assert torch.equal(weight, layer.dense_weight()) and torch.equal(bias, layer.conv.bias)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("groups", [g if g == 16 else pytest.param(g, marks=pytest.mark.exhaustive)
                                    for g in range(1, 17)])
def test_exported_forms_are_exact_for_every_group_count(groups, variant, tmp_path):
    """The deploy CLI's files for G = 16 (empty groups: G exceeds some layers' widths) by default, every G in
    1..16 with -m exhaustive (the default run's G = 5 with empty groups on purpose is above): the default ONNX form (custom ops) through the session helper, the stock-op ONNX form,
    the .pt2 program. (Eager forms: every G in test_deploy.py; compiled: G = 5 above, every G with -m exhaustive.)"""
    from flgc_lightning.deploy import onnxruntime_session

    torch.manual_seed(groups)
    model = trained_like(MobileNetV2(groups=groups, use_flgc=True, **VARIANTS[variant]), groups)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(groups))
    with torch.inference_mode():
        expected = model(x)
    assert expected.abs().max() > 0.5
    net = deploy_model(model, kernel="fused")
    export_onnx(net, tmp_path / "net.onnx")
    export_onnx(deploy_model(model, kernel="blockdiag", align_hidden=16), tmp_path / "stock.onnx", kernel="blockdiag")
    for name in ("net", "stock"):
        logits = onnxruntime_session(tmp_path / f"{name}.onnx").run(None, {"images": x.numpy()})[0]
        assert abs(logits - expected.numpy()).max() <= 1e-4, name
    export_program(net, tmp_path / "net.pt2")
    with torch.no_grad():
        reloaded = load_program(tmp_path / "net.pt2")(x.contiguous(memory_format=torch.channels_last))
    assert (reloaded - expected).abs().max() <= 1e-4


@pytest.mark.exhaustive
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("groups", range(1, 17))
def test_compiled_form_is_exact_for_every_group_count(groups, variant):
    torch.manual_seed(groups)
    model = trained_like(MobileNetV2(groups=groups, use_flgc=True, **VARIANTS[variant]), groups)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(groups))
    net = deploy_model(model, kernel="fused")
    with torch.inference_mode():
        expected = model(x)
        torch._dynamo.reset()
        compiled = compile_deployed(net)(x.contiguous(memory_format=torch.channels_last))
    assert (compiled - expected).abs().max() <= 1e-4


def test_fused_onnx_with_stock_layers_between_custom_ops(tmp_path, empty_groups):
    """A network whose blocks are not all fused (one projection block-diagonal, as kernel="auto" may choose): the
    stock-op block splits the custom nodes into two chains, with the transposes around it; still exact."""
    import onnx

    from flgc_lightning.deploy import onnxruntime_ops, onnxruntime_session
    from flgc_lightning.deploy.grouped import UnequalGroupConv2d

    model, _, _ = empty_groups("reference")
    net = deploy_model(model, kernel="fused")  # its own: one block's projection is switched below
    next(m for n, m in net.named_modules() if isinstance(m, UnequalGroupConv2d) and n.startswith("features.9.")
         ).kernel = "blockdiag"
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        expected = model(x)
    export_onnx(net, tmp_path / "net.onnx")
    rewritten = onnx.load(str(tmp_path / "net.onnx"))
    onnxruntime_ops._forget(onnxruntime_ops._with_cached_weights(rewritten))
    kinds = [n.op_type for n in rewritten.graph.node if n.domain == "ai.onnx.contrib"]
    assert kinds.count("FlgcChainCached") == 2 and "Conv" in [n.op_type for n in rewritten.graph.node][3:-3]
    logits = onnxruntime_session(tmp_path / "net.onnx").run(None, {"images": x.numpy()})[0]
    assert expected.abs().max() > 0.5 and abs(logits - expected.numpy()).max() <= 1e-4


def test_a_broken_onnx_file_is_refused_before_the_kernel_runs(tmp_path, empty_groups):
    """Kernel tables from a file are checked when the session is made: a segment pointing past the input
    channels is a clear TableError (a ValueError), never an out-of-bounds read; so are tables of the wrong type."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from flgc_lightning.deploy import onnxruntime_session
    from flgc_lightning.deploy.onnx_custom_ops import custom_nodes

    model = onnx.load(str(empty_groups("reference")[2]))
    node = custom_nodes(model)[3]
    ints = node.input[2]  # FlgcStep: x, residual, ints, floats
    for i, init in enumerate(model.graph.initializer):
        if init.name == ints:
            values = numpy_helper.to_array(init).copy()
            head = dict(zip(tables.HEADER, values[:len(tables.HEADER)].tolist()))
            at = (len(tables.HEADER) + tables.TASK_FIELDS * (head["e_tasks"] + head["tasks"])
                  + tables.SEGMENT_FIELDS * head["e_segments"] + head["e_out_index"])
            values[at] = 10_000  # first input channel of the projection's first segment
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(values.astype(np.int64), ints))
    onnx.save(model, str(tmp_path / "broken.onnx"))
    with pytest.raises(ValueError, match=r"read 100\d\d input channels, the input has"):
        onnxruntime_session(tmp_path / "broken.onnx")
    for i, init in enumerate(model.graph.initializer):  # the same table stored as floats: refused too
        if init.name == ints:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(values.astype(np.float32), ints))
    onnx.save(model, str(tmp_path / "floats.onnx"))
    with pytest.raises(ValueError, match="ints must be a contiguous 1-d torch.int64"):
        onnxruntime_session(tmp_path / "floats.onnx")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_fused_network_moved_to_cuda_runs_and_exports_its_steps_on_the_cpu(empty_groups):
    """On CUDA the fused steps run with stock ops (the kernel is CPU code), and a step's tensors stay on the CPU
    whatever device the network is on: the .pt2 export of a network moved to CUDA used to join CPU tables with the
    CUDA depthwise weights and fail (benchmarks/gpu_session.py's correctness section)."""
    model, net, _ = empty_groups("paper")
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    tf32 = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = False  # fp32 convs, for a 1e-4 comparison
        with torch.no_grad():
            expected = model.eval()(x)
            cuda_net = net.to("cuda")
            x_cuda = x.to("cuda").contiguous(memory_format=torch.channels_last)
            assert (cuda_net(x_cuda).cpu() - expected).abs().max() <= 1e-4
            program = export_program(cuda_net, None, x_cuda[:2]).module()
            assert (program(x_cuda).cpu() - expected).abs().max() <= 1e-4
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
        net.to("cpu")  # the module's other tests share this network


# A compiled ReLU6 + global-average-pool + classifier head, as a deployed MobileNetV2 ends: the inductor kernel that
# showed the bug (utils/inductor.py). Prints the largest difference to the eager module; compiled first, so a
# compiled output left unwritten cannot hold the eager result by chance.
SHARED_CACHE_RUN = r"""
import torch
from flgc_lightning.deploy import compile_deployed

class Head(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = torch.nn.Conv2d(320, 1280, 1), torch.nn.Linear(1280, 10)

    def forward(self, x):
        return self.fc(torch.nn.functional.relu6(self.conv(x)).mean((2, 3)))

torch.manual_seed(0)
head = Head().eval().to(memory_format=torch.channels_last)
x = torch.randn(3, 320, 4, 4).contiguous(memory_format=torch.channels_last)
with torch.inference_mode():
    got = compile_deployed(head)(x)
    print(float((got - head(x)).abs().max()))
"""


def test_compiled_forms_stay_exact_when_processes_of_two_vector_widths_share_inductors_cache(tmp_path):
    """An AVX-512 process, then one lowered to AVX2 (``ATEN_CPU_CAPABILITY=avx2``, as the benchmarks run), compiling
    through one ``TORCHINDUCTOR_CACHE_DIR``: each gets code for its own vector width (without the width in the key,
    the AVX2 process ran AVX-512-tiled code, left half the pooled outputs unwritten and printed nan; in the other
    order, the AVX-512 process wrote past its buffers and aborted in free())."""
    import subprocess
    import sys

    from conftest import REPO, cli_env
    from flgc_lightning.deploy import native

    if native.instruction_set() != "avx512":
        pytest.skip("needs a CPU that runs both AVX-512 and AVX2 code")
    env = {**cli_env(), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "OMP_NUM_THREADS": "1"}
    for capability in ("avx512", "avx2"):
        proc = subprocess.run([sys.executable, "-c", SHARED_CACHE_RUN], cwd=REPO, capture_output=True, text=True,
                              env={**env, "ATEN_CPU_CAPABILITY": capability}, timeout=600)
        assert proc.returncode == 0, (capability, proc.stderr[-2000:])
        assert float(proc.stdout.strip().splitlines()[-1]) <= 1e-5, (capability, proc.stdout)
