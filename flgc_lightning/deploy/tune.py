"""Per-layer kernel choice for unequal-group convs, by timing every available kernel on this machine."""
from __future__ import annotations

import statistics
import time
import warnings

import torch
from torch import nn

from flgc_lightning.deploy import native
from flgc_lightning.deploy.blocks import DeployedInvertedResidual
from flgc_lightning.deploy.grouped import UnequalGroupConv2d


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.no_grad()
def choose_kernels(net: nn.Module, batch: int = 64, channels_last: bool = True, repeats: int = 5,
                   input_size: tuple[int, int, int] = (3, 32, 32)) -> dict[str, str]:
    """Set every :class:`UnequalGroupConv2d` to its faster kernel here (both give the same outputs): ``fused`` or
    ``blockdiag``; ``blockdiag`` everywhere, with a warning that says why, where the fused kernel cannot be built.

    Each layer's input is captured from one forward pass at ``batch``; the two kernels are timed
    interleaved (one call each per round, after a warm-up call) and the lower median wins.
    Exception: a block's projection whose depthwise conv the fused kernel can take along is fused without
    timing (on its own the layer may time close to the other; with the depthwise conv fused the block saves a
    write and a read of its widest tensor, benchmarks/README.md), and so is an FLGC expand conv the block kernel
    then runs too (it is never called on its own). Returns ``{module name: chosen kernel}``.
    """
    layers = {name: m for name, m in net.named_modules() if isinstance(m, UnequalGroupConv2d)}
    try:
        native.load_library()
    except native.NativeKernelUnavailable as err:
        warnings.warn(f"fused unequal-group kernel unavailable ({err}); every FLGC layer runs blockdiag", stacklevel=3)
        for layer in layers.values():
            layer.kernel = "blockdiag"
        return {name: "blockdiag" for name in layers}
    chosen = {}
    for name, block in net.named_modules():
        if isinstance(block, DeployedInvertedResidual) and block.can_fuse_depthwise():
            names = [f"{name}.conv.{len(block.conv) - 1}.0"]
            if block.can_fuse_block() and f"{name}.conv.0.0" in layers:
                names.append(f"{name}.conv.0.0")
            for layer_name in names:
                chosen[layer_name] = layers.pop(layer_name).kernel = "fused"
    if not layers:
        return chosen
    inputs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: inputs.__setitem__(name, args[0]))
             for name, m in layers.items()]
    x = torch.randn(batch, *input_size)
    net(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
    for h in hooks:
        h.remove()
    for name, layer in layers.items():
        times: dict[str, list[float]] = {k: [] for k in UnequalGroupConv2d.KERNELS}
        for round_ in range(repeats + 1):  # round 0: warm-up (tables built, caches filled)
            for kernel in times:
                layer.kernel = kernel
                seconds = _seconds(lambda: layer(inputs[name]))
                if round_:
                    times[kernel].append(seconds)
        chosen[name] = layer.kernel = min(times, key=lambda k: statistics.median(times[k]))
    return chosen
