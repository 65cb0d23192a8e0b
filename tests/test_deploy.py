"""Deploy conversion: exact logits on real images, honest MACs, the fused kernels, exports, CLI."""
from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import cli_env, run_cli

from flgc_lightning.data.cifar import CIFAR_MEAN, CIFAR_STD
from flgc_lightning.data.cifar_files import CIFAR10, find_folder, load_split
from flgc_lightning.deploy import (
    UnequalGroupConv2d, deploy_model, deployed_macs, deployed_parameters, executed_macs, load_program,
)
from flgc_lightning.deploy import native, tables
from flgc_lightning.layers import Flgc2d
from flgc_lightning.models import MobileNetV2
from flgc_lightning.utils.complexity import count_macs, count_parameters

REPO = Path(__file__).resolve().parent.parent


def learned_macs_formula(model: nn.Module, input_size=(3, 32, 32)) -> int:
    """Independent arithmetic: sum_g |in_g| * |out_g| * k^2 * H * W of every FLGC layer of a trained model."""
    shapes: dict[nn.Module, tuple[int, int]] = {}
    hooks = [m.register_forward_hook(lambda mod, i, o: shapes.__setitem__(mod, tuple(o.shape[2:])))
             for m in model.modules() if isinstance(m, Flgc2d)]
    with torch.no_grad():
        model.eval()(torch.zeros(1, *input_size, device=next(model.parameters()).device))
    for h in hooks:
        h.remove()
    total = 0
    for layer, (h, w) in shapes.items():  # sum_g |in_g| |out_g| = ones in the connection mask
        connections = int(layer.connection_mask().detach().sum())
        total += connections * layer.kernel_size[0] * layer.kernel_size[1] * h * w
    return total


@pytest.fixture(scope="module")
def images(cifar_subset) -> torch.Tensor:
    """12 real CIFAR-10 test images, normalised as in training."""
    data, _ = load_split(find_folder(cifar_subset, CIFAR10), CIFAR10, train=False)
    x = torch.from_numpy(np.asarray(data[:12])).float().div(255)  # N x 3 x 32 x 32
    return (x - torch.tensor(CIFAR_MEAN)[:, None, None]) / torch.tensor(CIFAR_STD)[:, None, None]


def set_groups(layer: Flgc2d, in_groups: list[int], out_groups: list[int]) -> None:
    """Force an assignment by writing one-hot-peaked logits."""
    with torch.no_grad():
        layer.in_assign.normal_().mul_(0.1)[torch.arange(layer.in_channels), torch.tensor(in_groups)] += 10
        layer.out_assign.normal_().mul_(0.1)[torch.arange(layer.out_channels), torch.tensor(out_groups)] += 10


def trained_like(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial BN statistics and affine terms, a classifier with O(1) logits, eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) * 1.5 + 0.3)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
        model.classifier.weight.mul_(30)
    return model.eval()


def assert_exact(model: nn.Module, images: torch.Tensor, kernels=UnequalGroupConv2d.KERNELS) -> nn.Module:
    """Every kernel's deployed network gives the trained logits; returns the first one."""
    with torch.no_grad():
        expected = model(images)
    assert expected.abs().max() > 0.5  # logits large enough for 1e-4 to mean something
    nets = [deploy_model(model, kernel=kernel) for kernel in kernels]
    for kernel, deployed in zip(kernels, nets):
        with torch.no_grad():
            got = deployed(images.contiguous(memory_format=torch.channels_last))
        assert (got - expected).abs().max().item() <= 1e-4, kernel
        if kernel == "fused":  # the deploy step made each projection group's inputs one run of channels
            for block in deployed.features:  # (unless an FLGC expand conv sets the order): one segment per group
                m = block.conv[-1][0] if hasattr(block, "shortcut") else None
                if isinstance(m, UnequalGroupConv2d) and not isinstance(block.conv[0][0], UnequalGroupConv2d):
                    lanes = native.preferred_lanes()  # chunks of up to this many filters, one segment each
                    runs = sum(-(-o // lanes) for i, o in zip(m.in_sizes, m.out_sizes) if i)
                    assert m.tables()["tasks"][:, 1].sum() == runs
    return nets[0]


VARIANTS = {"reference": {}, "paper": {"group_expand": True, "group_shortcut": True}}
FLGC_LAYERS = {"reference": 17, "paper": 17 + 16 + 4}  # projections; + expand convs; + shortcut convs


@pytest.mark.parametrize("variant", VARIANTS)
# Default run: G = 1..5, 7, 8, 16 (divisors and non-divisors of every width, G > some widths' groups);
# the other G in 1..16 run with -m exhaustive.
@pytest.mark.parametrize("groups", [g if g in (1, 2, 3, 4, 5, 7, 8, 16) else pytest.param(g, marks=pytest.mark.exhaustive)
                                    for g in range(1, 17)])
def test_deployed_logits_equal_trained_for_every_group_count(groups, variant, images):
    torch.manual_seed(groups)
    model = MobileNetV2(groups=groups, use_flgc=True, **VARIANTS[variant])
    with torch.no_grad():  # a few train-mode passes give running stats that are not 0/1
        model.train()(images * 1.5)
    trained_like(model, groups)
    deployed = assert_exact(model, images)
    flgc = [m for m in model.modules() if isinstance(m, Flgc2d)]
    unequal = [m for m in deployed.modules() if isinstance(m, UnequalGroupConv2d)]
    assert len(unequal) == len(flgc) == (FLGC_LAYERS[variant] if groups > 1 else 0)
    if groups > 8:  # more groups than the narrow layers fill: some groups are empty on one side
        assert any(0 in m.in_sizes + m.out_sizes for m in unequal)


def test_empty_groups_on_either_side_are_exact(images):
    g = 6
    model = MobileNetV2(groups=g, use_flgc=True, group_expand=True, group_shortcut=True)
    flgc = [m for m in model.modules() if isinstance(m, Flgc2d)]
    for layer in flgc:  # group 0: inputs only; group 1: filters only; group 2: empty; rest: random
        n_in, n_out = layer.in_channels, layer.out_channels
        ins = [0] * (n_in // 3) + [3 + i % (g - 3) for i in range(n_in - n_in // 3)]
        outs = [1] * (n_out // 3) + [3 + i % (g - 3) for i in range(n_out - n_out // 3)]
        set_groups(layer, ins[::-1], outs)
    # one projection where no group has both inputs and filters: every filter outputs its bias only
    proj = model.features[4].projection
    set_groups(proj, [0] * proj.in_channels, [1] * proj.out_channels)
    trained_like(model, 0)
    deployed = assert_exact(model, images)
    layer = deployed.features[4].projection
    assert layer.in_sizes[1:3] == [0, 0] and layer.out_sizes[0] == 0 and layer.out_sizes[2] == 0


@pytest.mark.parametrize("kernel", UnequalGroupConv2d.KERNELS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_unequal_group_conv_matches_masked_conv(kernel, channels_last):
    torch.manual_seed(0)
    layer = Flgc2d(20, 12, 1, groups=5, bias=True)
    x = torch.randn(3, 20, 4, 4)
    residual = torch.randn(3, 12, 4, 4) * 3
    deployed = UnequalGroupConv2d(layer.weight.detach(), layer.bias.detach(), layer.input_groups(), layer.filter_groups(),
                                  5, kernel)
    if channels_last:
        x, deployed = x.contiguous(memory_format=torch.channels_last), deployed.to(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = layer(x)
        torch.testing.assert_close(deployed(x), expected, atol=1e-5, rtol=0)
        for other_kind in UnequalGroupConv2d.KERNELS:  # one stored weight: switching kernels is setting one
            other = copy.deepcopy(deployed)
            other.kernel = other_kind
            torch.testing.assert_close(other(x), expected, atol=1e-5, rtol=0)
        # residual added, then ReLU6, in the same call
        activated = deployed  # the layer that already ran: its fused step must follow the new setting
        activated.relu6 = True
        torch.testing.assert_close(activated(x, residual), (expected + residual).clamp(0, 6), atol=1e-5, rtol=0)
        assert 0 < ((expected + residual) > 6).sum() and 0 < ((expected + residual) < 0).sum()  # both clamps used
    torch.testing.assert_close(deployed.dense_weight(), layer.masked_weight().detach()[:, :, 0, 0])
    sizes_in, sizes_out = deployed.in_sizes, deployed.out_sizes
    executed = {"blockdiag": 20 * 12, "fused": sum(i * 8 for i, o in zip(sizes_in, sizes_out) if o)}  # <= 8 filters
    assert max(sizes_out) <= 8 and deployed.executed_connections == executed[kernel]


@pytest.fixture(params=[8, 16], ids=["8-lane", "16-lane"])
def lanes(request, monkeypatch):
    """Tables packed for 8-lane tasks, or with 16-lane (wide) tasks as on AVX-512, whatever this CPU prefers."""
    monkeypatch.setattr(native, "preferred_lanes", lambda: request.param)
    return request.param


@pytest.mark.parametrize("threads", [1, 2])
def test_fused_kernel_against_float64_reference(threads, lanes):
    """The compiled kernel on what the deploy step never produces but users might: inputs of a group
    scattered (not one run), groups of more than 8 filters, empty groups on either side, row counts
    that are no multiple of the kernel's 8/64-row blocks, NCHW inputs."""
    gen = torch.Generator().manual_seed(5)
    c_in, c_out, g = 37, 29, 5
    in_groups = torch.randint(0, 3, (c_in,), generator=gen)        # groups 3, 4: no inputs
    out_groups = torch.randint(1, 5, (c_out,), generator=gen)      # group 0: no filters
    out_groups[:20] = 2                                            # one group of 20+ filters: 3 vectors
    weight, bias = torch.randn(c_out, c_in, generator=gen), torch.randn(c_out, generator=gen)
    mask = (out_groups[:, None] == in_groups[None, :]).double()
    layer = UnequalGroupConv2d(weight, bias, in_groups, out_groups, g, "fused")
    assert len(layer.tables()["segments"]) > g  # scattered inputs -> several runs per group
    filters_per_task = layer.tables()["tasks"][:, 3]
    chunks = sum(-(-int((out_groups == k).sum()) // lanes) for k in range(g))
    assert filters_per_task.max() <= lanes and len(filters_per_task) < chunks  # small groups share a task
    assert torch.equal(tables.task_lanes(layer.tables()), torch.where(filters_per_task > 8, 16, 8))
    # windows: tasks are the next `lanes` output channels, whatever their groups (FLGC expand convs use this)
    windowed = UnequalGroupConv2d(weight, bias, in_groups, out_groups, g, "fused", windows=True)
    tasks = windowed.tables()["tasks"]
    assert len(tasks) == -(-c_out // lanes) and tasks[:-1, 3].eq(lanes).all() and tasks[-1, 3] == c_out % lanes
    assert torch.equal(windowed.tables()["out_index"] // lanes, torch.arange(c_out) // lanes)  # outputs in order
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for shape in [(3, c_in, 5, 7), (1, c_in, 1, 1), (2, c_in, 16, 9)]:
            x = torch.randn(*shape, generator=gen)
            expected = torch.einsum("oi,nihw->nohw", weight.double() * mask, x.double()) + bias.double()[:, None, None]
            with torch.no_grad():
                got = layer(x)
                got_cl = layer(x.contiguous(memory_format=torch.channels_last))
                got_windowed = windowed(x)
            assert got.is_contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)
            torch.testing.assert_close(got_cl, got, atol=0, rtol=0)
            torch.testing.assert_close(got_windowed.double(), expected, atol=1e-5, rtol=0)
    finally:
        torch.set_num_threads(previous)
    # filters of a group without inputs output their bias
    lonely = (out_groups == 3) | (out_groups == 4)
    assert lonely.any()
    torch.testing.assert_close(got[:, lonely], bias[lonely][None, :, None, None].expand(2, -1, 16, 9))
    # lanes: 3 vectors for the big group, 1 for the others that have filters
    if lanes == 8:
        expected_exec = sum(int((in_groups == k).sum()) * 8 * -(-int((out_groups == k).sum()) // 8) for k in range(g))
        assert layer.executed_connections == expected_exec


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("stride", [1, 2])
def test_fused_depthwise_kernel_against_float64_reference(threads, stride, lanes):
    """Depthwise 3x3 (+ bias, ReLU6) feeding the unequal-group conv in one pass, against float64 stock ops:
    channel counts with a tail past the 8-float vectors, odd map sizes (padding at every border, output pixel
    counts that are no multiple of 8), scattered groups, a residual and a final ReLU6."""
    gen = torch.Generator().manual_seed(stride)
    c, c_out, g = 21, 11, 4
    in_groups, out_groups = torch.randint(0, g, (c,), generator=gen), torch.randint(0, g, (c_out,), generator=gen)
    weight, bias = torch.randn(c_out, c, generator=gen), torch.randn(c_out, generator=gen)
    dw_weight, dw_bias = torch.randn(c, 1, 3, 3, generator=gen), torch.randn(c, generator=gen)
    t = UnequalGroupConv2d(weight, bias, in_groups, out_groups, g, "fused").tables()
    mask = (out_groups[:, None] == in_groups[None, :]).double()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for shape in [(2, c, 7, 5), (1, c, 1, 1), (3, c, 9, 16)]:
            x = torch.randn(*shape, generator=gen) * 2
            hidden = torch.nn.functional.conv2d(x.double(), dw_weight.double(), dw_bias.double(), stride, 1, 1, c)
            expected = torch.einsum("oi,nihw->nohw", weight.double() * mask, hidden.clamp(0, 6)) + bias.double()[:, None, None]
            residual = torch.randn(expected.shape, generator=gen) * 3
            for res, relu6 in [(None, False), (residual, True)]:
                want = expected if res is None else (expected + res.double()).clamp(0, 6)
                ints, floats = tables.make_step(t, c, c_out, relu6, dw_taps=tables.depthwise_taps(dw_weight),
                                                dw_bias=dw_bias, stride=stride)
                got = torch.ops.flgc.fused_step(x, ints, floats, res, c_out, stride)
                assert got.is_contiguous(memory_format=torch.channels_last) and got.shape == want.shape
                torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=0)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("expand", ["dense", "flgc"])
def test_fused_block_kernel_against_float64_reference(threads, stride, expand, lanes):
    """A whole inverted-residual block in one kernel (expand 1x1 + ReLU6, depthwise 3x3 + ReLU6, projection,
    residual, ReLU6) against float64 stock ops: a hidden width with a tail past the 8-float vectors, odd map
    sizes, scattered groups, one image (the threads share it) and several (one image per thread)."""
    gen = torch.Generator().manual_seed(10 * stride + threads)
    c_in, hidden, c_out, g = 13, 21, 11, 4
    in_groups, out_groups = torch.randint(0, g, (hidden,), generator=gen), torch.randint(0, g, (c_out,), generator=gen)
    e_weight, e_bias = torch.randn(hidden, c_in, generator=gen) * 0.5, torch.randn(hidden, generator=gen)
    if expand == "dense":
        e_in, e_out, e_groups = torch.zeros(c_in, dtype=torch.long), torch.zeros(hidden, dtype=torch.long), 1
    else:
        e_in, e_out, e_groups = torch.randint(0, 3, (c_in,), generator=gen), torch.randint(0, 3, (hidden,), generator=gen), 3
    weight, bias = torch.randn(c_out, hidden, generator=gen), torch.randn(c_out, generator=gen)
    dw_weight, dw_bias = torch.randn(hidden, 1, 3, 3, generator=gen), torch.randn(hidden, generator=gen)
    e = UnequalGroupConv2d(e_weight, e_bias, e_in, e_out, e_groups, "fused", relu6=True, windows=True).tables()
    t = UnequalGroupConv2d(weight, bias, in_groups, out_groups, g, "fused").tables()
    e_mask = (e_out[:, None] == e_in[None, :]).double()
    mask = (out_groups[:, None] == in_groups[None, :]).double()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for shape in [(1, c_in, 7, 5), (3, c_in, 1, 1), (3, c_in, 9, 16)]:
            x = torch.randn(*shape, generator=gen) * 2
            expanded = (torch.einsum("oi,nihw->nohw", e_weight.double() * e_mask, x.double())
                        + e_bias.double()[:, None, None]).clamp(0, 6)
            dw = torch.nn.functional.conv2d(expanded, dw_weight.double(), dw_bias.double(), stride, 1, 1, hidden)
            projected = torch.einsum("oi,nihw->nohw", weight.double() * mask, dw.clamp(0, 6)) + bias.double()[:, None, None]
            residual = torch.randn(projected.shape, generator=gen) * 3
            for res, relu6 in [(None, False), (residual, True)]:
                want = projected if res is None else (projected + res.double()).clamp(0, 6)
                ints, floats = tables.make_step(t, c_in, c_out, relu6, e, tables.depthwise_taps(dw_weight), dw_bias,
                                                stride)
                got = torch.ops.flgc.fused_step(x, ints, floats, res, c_out, stride)
                assert got.is_contiguous(memory_format=torch.channels_last) and got.shape == want.shape
                torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=0)
    finally:
        torch.set_num_threads(previous)


def test_deployed_blocks_run_as_one_kernel_each(monkeypatch):
    """Every FLGC block with an expand conv runs as one block step (one op call, no expand/depthwise modules
    called on their own); the block without one runs a depthwise + projection step."""
    from flgc_lightning.deploy import ops

    original = ops.apply
    for variant in VARIANTS:
        net = deploy_model(trained_like(MobileNetV2(groups=4, use_flgc=True, **VARIANTS[variant]), 0), kernel="fused")
        blocks = [b for b in net.features if hasattr(b, "use_residual")]
        assert [b.can_fuse_block() for b in blocks] == [False] + [True] * (len(blocks) - 1)
        kinds, stages = [], []
        monkeypatch.setattr(ops, "apply", lambda step, *a: (kinds.append(step.kind), original(step, *a))[1])
        hooks = [s.register_forward_hook(lambda *a: stages.append(1)) for b in blocks[1:] for s in b.conv[:2]]
        with torch.no_grad():
            net(torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last))
        for h in hooks:
            h.remove()
        assert (kinds.count(tables.BLOCK), kinds.count(tables.DEPTHWISE), len(stages)) == (len(blocks) - 1, 1, 0), variant


def test_a_block_follows_a_replaced_stage_and_changed_weights():
    """A block works out once which stages its fused step takes; replacing a stage's module (or changing weights in
    place) is still seen on the next call, without any refresh call: the same logits as running the stages one by
    one."""
    net = deploy_model(trained_like(MobileNetV2(groups=4, use_flgc=True), 2), kernel="fused")
    block = net.features[5]
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        before = net(x)
        p = block.conv[-1][0]
        block.conv[-1][0] = UnequalGroupConv2d(p.dense_weight() * 3, p.conv.bias, p.in_groups, p.out_groups,
                                               p.num_groups, "fused", p.relu6)
        block.conv[1][0].weight.mul_(0.5)  # the depthwise conv, in place
        fused = net(x)
        block.fuse_depthwise = False  # every stage as its own module
        stagewise = net(x)
    assert (fused - before).abs().max() > 1e-2
    torch.testing.assert_close(fused, stagewise, atol=1e-4, rtol=0)


def test_custom_op_falls_back_to_stock_ops_without_the_library(monkeypatch):
    """A program that holds the custom op (e.g. a .pt2 written elsewhere) runs where the kernel cannot be
    built: same numbers from stock ops, one warning; the eager network gives the same logits too."""
    from flgc_lightning.deploy import grouped, ops

    torch.manual_seed(3)
    model = trained_like(MobileNetV2(groups=5, use_flgc=True, group_expand=True, group_shortcut=True), 3)
    net = deploy_model(model, kernel="fused")
    x = torch.randn(3, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    block = net.features[5]  # 32 -> 32, stride 1, identity residual; FLGC expand conv
    proj, dw = block.projection, block.conv[-2][0]
    depthwise_step = tables.make_step(proj.tables(), proj.in_channels, proj.out_channels, False,
                                      dw_taps=tables.depthwise_taps(dw.weight), dw_bias=dw.bias, stride=1)
    residual = torch.randn(2, proj.out_channels, 4, 4)
    calls = {"depthwise": (torch.randn(2, proj.in_channels, 4, 4), *depthwise_step, residual, proj.out_channels, 1),
             "block": (torch.randn(2, block.conv[0][0].in_channels, 4, 4), *block.step(), residual, proj.out_channels, 1),
             "layer": (torch.randn(2, proj.in_channels, 4, 4), *proj.step(), None, proj.out_channels, 1)}
    with torch.no_grad():
        expected, native_out = model(x), net(x)
        with_library = {k: torch.ops.flgc.fused_step(*a) for k, a in calls.items()}
        monkeypatch.setattr(native, "available", lambda: False)
        monkeypatch.setattr(ops, "_warned", False)
        with pytest.warns(UserWarning, match="running stock PyTorch ops instead"):
            without = {k: torch.ops.flgc.fused_step(*a) for k, a in calls.items()}
        monkeypatch.setattr(grouped.kernel_available, "warned", True, raising=False)  # the layers' own warning
        fallback = net(x)  # eager: the layers' block-diagonal convs, depthwise convs on their own
    for k in calls:
        torch.testing.assert_close(without[k], with_library[k], atol=1e-4, rtol=0)
    torch.testing.assert_close(native_out, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(fallback, expected, atol=1e-4, rtol=0)


def test_fused_kernel_falls_back_where_it_cannot_run(monkeypatch):
    """No compiler (or autograd): the block-diagonal conv runs, same numbers; asking for fused explicitly is an
    error."""
    from flgc_lightning.deploy import grouped
    from flgc_lightning.deploy.convert import DeployError

    torch.manual_seed(2)
    layer = Flgc2d(16, 12, 1, groups=4, bias=True)
    fused = UnequalGroupConv2d(layer.weight.detach(), layer.bias.detach(), layer.input_groups(), layer.filter_groups(),
                               4, "fused")
    x = torch.randn(2, 16, 3, 3, requires_grad=True)
    out = fused(x)  # autograd wanted: the stock conv, which has a grad_fn
    assert out.grad_fn is not None
    out.sum().backward()
    assert x.grad is not None

    with torch.no_grad():
        with pytest.raises(RuntimeError):  # wrong channel count: an error (stock conv), never a read past x
            fused(torch.randn(2, 8, 3, 3))
        # new weights (load_state_dict copies in place): the fused tables follow
        other = Flgc2d(16, 12, 1, groups=4, bias=True)
        other.load_state_dict({**layer.state_dict(), "weight": torch.randn(12, 16, 1, 1), "bias": torch.randn(12)})
        fused.load_state_dict(UnequalGroupConv2d(other.weight, other.bias, layer.input_groups(),
                                                 layer.filter_groups(), 4, "fused").state_dict())
        torch.testing.assert_close(fused(x), other(x), atol=1e-5, rtol=0)
        assert fused.tables() is fused.tables()  # rebuilt once, then cached
        wide = copy.deepcopy(fused).double()  # float64 weights: the stock conv runs, in float64
        torch.testing.assert_close(wide(x.double()), copy.deepcopy(other).double()(x.double()))

    def no_compiler():
        raise native.NativeKernelUnavailable("no C compiler found")

    monkeypatch.setattr(native, "load_library", no_compiler)
    monkeypatch.setattr(grouped.kernel_available, "warned", False, raising=False)
    with torch.no_grad(), pytest.warns(UserWarning, match="block-diagonal dense conv instead"):
        torch.testing.assert_close(fused(x), other(x), atol=1e-5, rtol=0)
    with pytest.raises(DeployError, match="fused kernel cannot be built here: no C compiler"):
        deploy_model(MobileNetV2(groups=4, use_flgc=True), kernel="fused")
    with pytest.warns(UserWarning, match="every FLGC layer runs blockdiag"):
        auto = deploy_model(MobileNetV2(groups=4, use_flgc=True), kernel="auto")
    assert {m.kernel for m in auto.modules() if isinstance(m, UnequalGroupConv2d)} == {"blockdiag"}


def test_saved_forms_hold_each_weight_once(tmp_path):
    """A deployed layer stores its weights once: the pickled module holds its parameters and nothing derived from
    them (the fused steps are rebuilt on load), and a .pt2 program holds the weights of what runs in a fused step
    only inside that step (no unused parameter copy of any block's convs)."""
    import io
    import re

    from flgc_lightning.deploy import export_program

    torch.manual_seed(6)
    net = deploy_model(trained_like(MobileNetV2(groups=4, use_flgc=True, width_mult=0.5), 6), kernel="fused")
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = net(x)  # builds every step
    buffer = io.BytesIO()
    torch.save(net, buffer)
    parameter_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
    assert len(buffer.getvalue()) < parameter_bytes * 1.05 + 200_000
    reloaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)  # our own bytes: trusted
    with torch.no_grad():
        assert torch.equal(reloaded(x), expected)
    program = export_program(net, tmp_path / "net.pt2")
    inside_blocks = [k for k in program.state_dict if re.match(r"features\.\d+\.conv\.", k)]
    assert not inside_blocks  # every block runs as one step: its convs' weights are in the step's floats only
    steps = sum(t.numel() * t.element_size() for t in program.constants.values())
    stored = sum(t.numel() * t.element_size() for t in program.state_dict.values())
    assert steps + stored < parameter_bytes  # the steps hold learned connections (and vector lanes), not dense weights
    with torch.no_grad():
        torch.testing.assert_close(load_program(tmp_path / "net.pt2")(x), expected, atol=1e-5, rtol=0)


def test_fused_kernel_builds_from_scratch_in_its_cache_folder(tmp_path):
    """What a fresh machine does on first use: compile into the cache folder, load, run."""
    code = ("import torch; from flgc_lightning.deploy import native; lib = native.load_library(); "
            "print(' '.join(lib.flags))")
    env = {**cli_env(), "FLGC_NATIVE_CACHE": str(tmp_path / "cache")}
    proc = run_cli("-c", code, env=env, check=False)
    if proc.returncode != 0 and "NativeKernelUnavailable" in proc.stderr:
        pytest.skip(f"no working C compiler here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr
    assert "-O3" in proc.stdout
    assert len(list((tmp_path / "cache").glob("unequal_group_conv-*.so"))) == 1
    assert not list((tmp_path / "cache").glob("tmp*"))  # no half-written files left
    (library,) = (tmp_path / "cache").glob("unequal_group_conv-*.so")
    library.write_bytes(b"damaged")  # a broken cached library is rebuilt, not a crash
    proc = run_cli("-c", code, env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    assert library.stat().st_size > 1000
    (tmp_path / "not-a-folder").write_text("")  # cache folder cannot be created: the temp folder is used
    proc = run_cli("-c", code, env={**env, "FLGC_NATIVE_CACHE": str(tmp_path / "not-a-folder" / "cache")},
                   check=False)
    assert proc.returncode == 0, proc.stderr


def test_every_instruction_set_this_cpu_runs_is_built_and_checked(monkeypatch):
    """The library is built for an instruction set chosen at run time from the CPU's features, named in explicit
    flags (no -march=native, so it moves between machines of one kind). Every narrower set this CPU also runs is
    built and checked against float64 as well: on an AVX-512 machine that is the AVX2 code AVX2-only CPUs run
    (8-lane tasks, wide tasks as two vectors) and the generic vector code."""
    isas = native.instruction_sets_here()
    assert isas[0] == native.instruction_set() and isas[-1] == "baseline"
    if not native.available():
        pytest.skip("no working C compiler here")
    flags = native.load_library().flags
    assert "-march=native" not in flags and set(native.INSTRUCTION_SETS[isas[0]]) <= set(flags), flags
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists() and not os.environ.get("ATEN_CPU_CAPABILITY") and isas[0] != "baseline":
        # torch's detection agrees with the CPU's own flags: the library must never use an instruction it lacks
        flags = set(next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split())
        need = {"avx512": {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx2", "fma"}, "avx2": {"avx2", "fma"}}
        assert need[isas[0]] <= flags, (isas[0], sorted(flags & {f for n in need.values() for f in n}))
    for isa in isas:
        library = native.build(isa)
        assert set(native.INSTRUCTION_SETS[isa]) <= set(library.flags) and library.openmp
        assert library.preferred_lanes() == (8 if isa == "baseline" else 16)
        monkeypatch.setattr(native, "_library", library)
        for lanes in (8, 16):
            monkeypatch.setattr(native, "preferred_lanes", lambda lanes=lanes: lanes)
            test_fused_kernel_against_float64_reference(2, lanes)
            test_fused_depthwise_kernel_against_float64_reference(2, 2, lanes)
            for expand in ("dense", "flgc"):
                test_fused_block_kernel_against_float64_reference(2, 1, expand, lanes)


def test_build_kernel_command_builds_once_and_says_what(tmp_path):
    env = {**cli_env(), "FLGC_NATIVE_CACHE": str(tmp_path / "cache")}
    env.pop("FLGC_NATIVE_FLAGS", None)
    proc = run_cli("-m", "flgc_lightning.deploy", "--build-kernel", env=env, check=False)
    if proc.returncode != 0 and "cannot be built here" in proc.stderr:
        pytest.skip(proc.stderr.strip())
    assert proc.returncode == 0, proc.stderr
    (library,) = (tmp_path / "cache").glob("unequal_group_conv-*.so")
    assert f"fused kernel for this CPU ({native.instruction_set()}): {library}" in proc.stdout
    assert "OpenMP on" in proc.stdout and "-march=native" not in proc.stdout
    modified = library.stat().st_mtime_ns
    again = run_cli("-m", "flgc_lightning.deploy", "--build-kernel", env=env, check=False)
    assert again.returncode == 0 and library.stat().st_mtime_ns == modified  # found, not rebuilt
    missing = run_cli("-m", "flgc_lightning.deploy", "--out", str(tmp_path), check=False)
    assert missing.returncode == 2 and "a checkpoint and --out are required" in missing.stderr


def test_a_compiler_without_openmp_gives_a_one_thread_library_and_says_so(tmp_path, monkeypatch):
    """Apple clang refuses -fopenmp: the kernel is still built, without it, and a warning says it runs on one
    thread (a fake compiler that refuses -fopenmp and otherwise calls the real one)."""
    real = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
    if real is None:
        pytest.skip("no C compiler here")
    fake = tmp_path / "cc-without-openmp"
    fake.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && {{ echo "unsupported option -fopenmp" >&2; '
                    f'exit 1; }}; done\nexec {real} "$@"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    monkeypatch.setenv("FLGC_NATIVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FLGC_NATIVE_FLAGS", raising=False)
    with pytest.warns(UserWarning, match="cannot build with OpenMP .* runs on one thread"):
        library = native.build(native.instruction_set())
    assert not library.openmp and "-fopenmp" not in library.flags
    assert "OpenMP off (one thread)" in native.describe(library)


@pytest.mark.parametrize("variant", VARIANTS)
def test_auto_kernel_choice_keeps_logits(images, variant):
    """Timed per-layer choice; an FLGC expand conv that runs inside the block kernel is never called on its own,
    so it is fused without timing (the paper variant)."""
    torch.manual_seed(11)
    model = trained_like(MobileNetV2(groups=4, use_flgc=True, **VARIANTS[variant]), 11)
    deployed = deploy_model(model, kernel="auto")
    kernels = {m.kernel for m in deployed.modules() if isinstance(m, UnequalGroupConv2d)}
    assert kernels and kernels <= set(UnequalGroupConv2d.KERNELS)
    blocks = [b for b in deployed.features if hasattr(b, "can_fuse_block") and b.can_fuse_block()]
    assert len(blocks) == 16 and all(b.projection.kernel == "fused" for b in blocks)
    if variant == "paper":
        assert all(b.conv[0][0].kernel == "fused" for b in blocks)
    with torch.no_grad():
        assert (deployed(images.contiguous(memory_format=torch.channels_last)) - model(images)).abs().max() <= 1e-4


def every_group_with_filters(model: nn.Module, seed: int) -> nn.Module:
    """Random unequal groups in which every group has filters (filters 0..G-1 one per group), so the deploy step
    drops no hidden channel and the deployed widths are the trained ones."""
    gen = torch.Generator().manual_seed(seed)
    for layer in model.modules():
        if isinstance(layer, Flgc2d):
            g = layer.num_groups
            outs = torch.cat([torch.arange(g), torch.randint(0, g, (layer.out_channels - g,), generator=gen)])
            set_groups(layer, torch.randint(0, g, (layer.in_channels,), generator=gen).tolist(), outs.tolist())
    return model.eval()


def test_deployed_macs_agree_with_learned_group_sizes():
    torch.manual_seed(3)
    flgc = every_group_with_filters(MobileNetV2(groups=8, use_flgc=True), 3)
    dense = MobileNetV2().eval()
    formula = learned_macs_formula(flgc)  # sum_g |in_g| |out_g| H W over the 17 projections
    dense_projection = learned_macs_formula(MobileNetV2(groups=1, use_flgc=True))  # G=1: no FLGC layers
    assert dense_projection == 0
    proj_dense = sum(m.in_channels * m.out_channels * hw for m, hw in zip(
        [b.projection for b in flgc.features if hasattr(b, "projection")], PROJECTION_POSITIONS))
    # trained form, ptflops with the learned-cost hook
    trained_delta = count_macs(flgc, flgc_cost="learned") - count_macs(dense)
    # deployed form, ptflops on standard modules + the UnequalGroupConv2d hook; every group that has inputs has
    # filters here, so the deploy step drops no hidden channel and the widths are the dense network's
    assert not any(i and not o for b in flgc.features if hasattr(b, "projection")
                   for i, o in zip(torch.bincount(b.projection.input_groups(), minlength=8).tolist(),
                                   torch.bincount(b.projection.filter_groups(), minlength=8).tolist()))
    blockdiag = deploy_model(flgc, kernel="blockdiag")
    deployed_delta = deployed_macs(blockdiag) - deployed_macs(deploy_model(dense))
    assert trained_delta == deployed_delta == formula - proj_dense
    # one layer on its own: learned connections times positions, plus the bias adds
    layer = blockdiag.features[5].projection
    assert deployed_macs(layer, (layer.in_channels, 16, 16)) == (layer.learned_connections + layer.out_channels) * 256
    # what the kernels execute: the whole dense product (blockdiag), 8- or 16-filter vector lanes (fused)
    fused = deploy_model(flgc, kernel="fused")
    # the fused network keeps hidden widths at multiples of its 8-float vectors (unread channels, zero weights)
    assert deployed_macs(fused) == deployed_macs(deploy_model(flgc, kernel="blockdiag", align_hidden=8))
    assert deployed_macs(fused) >= deployed_macs(blockdiag)
    for net in (blockdiag, fused):
        layers = [m for m in net.modules() if isinstance(m, UnequalGroupConv2d)]
        extra = sum((m.executed_connections - m.learned_connections + m.executed_outputs - m.out_channels) * hw
                    for m, hw in zip(layers, PROJECTION_POSITIONS))
        assert executed_macs(net) - deployed_macs(net) == extra
    assert all(m.executed_connections == m.in_channels * m.out_channels
               for m in blockdiag.modules() if isinstance(m, UnequalGroupConv2d))
    assert executed_macs(blockdiag) > executed_macs(fused) > deployed_macs(blockdiag)


PROJECTION_POSITIONS = [32 * 32] * 3 + [16 * 16] * 3 + [8 * 8] * 7 + [4 * 4] * 4


def test_deployed_parameters_count_only_weights_inside_groups():
    torch.manual_seed(4)
    flgc = every_group_with_filters(MobileNetV2(groups=8, use_flgc=True), 4)
    deployed = deploy_model(flgc, kernel="blockdiag")
    plain = deploy_model(MobileNetV2().eval())
    proj = [b.projection for b in flgc.features if hasattr(b, "projection")]
    assert all(torch.bincount(p.filter_groups(), minlength=8).gt(0).all() for p in proj)  # no hidden channel dropped
    learned = sum(int((torch.bincount(p.input_groups(), minlength=8) * torch.bincount(p.filter_groups(), minlength=8)).sum()) for p in proj)
    dense = sum(p.in_channels * p.out_channels for p in proj)
    assert deployed_parameters(deployed) == count_parameters(plain) - dense + learned
    assert deployed_parameters(plain) == count_parameters(plain)


def write_checkpoint(path: Path, groups: int, input_size=(3, 32, 32), width: float = 1.0) -> nn.Module:
    """A checkpoint in train.py's format (keys checked by load_checkpoint)."""
    from flgc_lightning.training.module import ImageClassifier

    module = ImageClassifier(
        model={"_target_": "flgc_lightning.models.MobileNetV2", "num_classes": 10, "groups": groups, "use_flgc": True,
               "in_channels": input_size[0], "width_mult": width},
        optimizer={"_target_": "torch.optim.SGD", "lr": 0.1},
        input_size=input_size,
    )
    trained_like(module.net, 1)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "flgc_config": {}, "epoch": 0}, path)
    return module.net


LOAD_AND_RUN = """
import sys, numpy as np, onnxruntime, torch
from flgc_lightning.deploy import load_program  # checks the file, then loads it (fused steps registered)
from flgc_lightning.deploy.onnxruntime_ops import session as onnxruntime_session  # the ONNX file's custom ops
out, x = sys.argv[1], torch.from_numpy(np.load(sys.argv[2]))
program = load_program(out + "/deployed.pt2")
session = onnxruntime_session(out + "/deployed.onnx")
assert not {"pytorch_lightning", "lightning", "hydra"} & set(sys.modules)  # no training code
with torch.no_grad():
    np.save(out + "/pt2.npy", program(x.contiguous(memory_format=torch.channels_last)).numpy())
np.save(out + "/onnx.npy", session.run(None, {"images": x.numpy()})[0])
"""


@pytest.mark.slow
@pytest.mark.parametrize("input_size", [(3, 32, 32), (1, 16, 16)], ids=["cifar", "quickstart-digits"])
def test_cli_deploys_and_exports_a_checkpoint(tmp_path, input_size):
    """The CLI's files, loaded and run on their own (a plain onnxruntime session, load_program in a fresh
    process), agree with the trained network; so does the pickled module. Width 0.25 and a named kernel: the
    full-width networks and kernel=auto's timing are checked in-process above; here the command line is."""
    trained = write_checkpoint(tmp_path / "flgc.ckpt", groups=8, input_size=input_size, width=0.25)
    # CIFAR case: the default export form (fused); digits: the stock-op form
    kernel, export_form = ("blockdiag", ["--export-kernel", "blockdiag"]) if input_size[0] == 1 else ("fused", [])
    proc = run_cli("-m", "flgc_lightning.deploy", str(tmp_path / "flgc.ckpt"), "--out", str(tmp_path / "out"), "--onnx",
                   "--kernel", kernel, *export_form, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "deployed : params" in proc.stdout and f"FLGC layer kernels ({kernel}): {kernel} x17" in proc.stdout
    out = tmp_path / "out"
    import onnx
    ops = {n.op_type for n in onnx.load(str(out / "deployed.onnx")).graph.node}
    assert not {"Gather", "GatherElements"} & ops  # no channel gathers in either form
    assert ("FlgcStep" in ops) == (not export_form)  # the default: custom ops running our kernel
    x = torch.randn(5, *input_size, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        expected = trained.eval()(x)
    np.save(tmp_path / "x.npy", x.numpy())
    run = run_cli("-c", LOAD_AND_RUN, str(out), str(tmp_path / "x.npy"), cwd=tmp_path, check=False,
                  plain=True)  # a fresh python: the deployed files need no training libraries
    assert run.returncode == 0, run.stderr
    for name in ("pt2", "onnx"):
        assert (torch.from_numpy(np.load(out / f"{name}.npy")) - expected).abs().max() <= 1e-4, name
    reloaded = torch.load(out / "deployed.pt", weights_only=False)  # our own file: trusted
    with torch.no_grad():
        assert (reloaded(x.contiguous(memory_format=torch.channels_last)) - expected).abs().max() <= 1e-4
    assert expected.abs().max() > 0.5  # large enough for 1e-4 to mean something


@pytest.mark.slow
def test_cli_without_a_c_compiler(tmp_path):
    """No compiler on PATH: auto warns and deploys with stock ops, the same numbers as the trained network (the
    module and the ONNX file); --kernel fused is a clear error."""
    import onnxruntime

    trained = write_checkpoint(tmp_path / "flgc.ckpt", groups=4, width=0.25)
    env = {**os.environ, "PATH": str(tmp_path / "empty"), "FLGC_NATIVE_CACHE": str(tmp_path / "cache")}
    env.pop("CC", None)
    base = [sys.executable, "-m", "flgc_lightning.deploy", str(tmp_path / "flgc.ckpt")]
    auto = subprocess.run([*base, "--out", str(tmp_path / "auto"), "--onnx"], cwd=REPO, env=env, capture_output=True,
                          text=True)
    assert auto.returncode == 0, auto.stderr
    assert "fused unequal-group kernel unavailable (no C compiler found" in auto.stderr
    kernels = auto.stdout.split("FLGC layer kernels (auto):")[1].splitlines()[0]
    assert "fused" not in kernels and kernels.strip()
    assert "the ONNX file uses stock ops (blockdiag)" in auto.stdout and "FLGC layers blockdiag" in auto.stdout
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        expected = trained.eval()(x)
        module = torch.load(tmp_path / "auto" / "deployed.pt", weights_only=False)  # our own file: trusted
        assert (module(x.contiguous(memory_format=torch.channels_last)) - expected).abs().max() <= 1e-4
    session = onnxruntime.InferenceSession(str(tmp_path / "auto" / "deployed.onnx"), providers=["CPUExecutionProvider"])
    assert abs(session.run(None, {"images": x.numpy()})[0] - expected.numpy()).max() <= 1e-4  # stock ops alone
    assert expected.abs().max() > 0.5
    fused = subprocess.run([*base, "--out", str(tmp_path / "fused"), "--kernel", "fused"], cwd=REPO, env=env,
                           capture_output=True, text=True)
    assert fused.returncode == 1
    assert fused.stderr.startswith("error: the fused kernel cannot be built here: no C compiler found")
    assert not (tmp_path / "fused").exists()


def test_cli_reports_a_missing_checkpoint(tmp_path):
    proc = run_cli("-m", "flgc_lightning.deploy", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path), check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: checkpoint") and "does not exist" in proc.stderr
