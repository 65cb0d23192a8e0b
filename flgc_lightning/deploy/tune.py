"""Per-layer kernel choice for unequal-group convs, by timing every available kernel on this machine."""
from __future__ import annotations

import statistics
import time
import warnings

import torch
from torch import nn

from flgc_lightning.deploy import native
from flgc_lightning.deploy.blocks import DeployedInvertedResidual
from flgc_lightning.deploy.grouped import UnequalGroupConv2d, replace_module


def available_kernels() -> tuple[str, ...]:
    """The kernels that run here: ``fused`` only where its C source compiles (else a warning says why)."""
    try:
        native.load_library()
        return UnequalGroupConv2d.KERNELS
    except native.NativeKernelUnavailable as err:
        warnings.warn(f"fused unequal-group kernel unavailable ({err}); choosing among padded and blockdiag",
                      stacklevel=3)
        return tuple(k for k in UnequalGroupConv2d.KERNELS if k != "fused")


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.no_grad()
def choose_kernels(net: nn.Module, batch: int = 64, channels_last: bool = True, repeats: int = 5,
                   input_size: tuple[int, int, int] = (3, 32, 32)) -> dict[str, str]:
    """Replace every :class:`UnequalGroupConv2d` by its fastest kernel variant (all give the same outputs).

    Each layer's input is captured from one forward pass at ``batch``; the variants are timed
    interleaved (one call each per round, after a warm-up call) and the lowest median wins.
    Exception: a block's projection whose depthwise conv the fused kernel can take along is fused without
    timing (on its own the layer may time close to the others; with the depthwise conv fused the block saves a
    write and a read of its widest tensor, benchmarks/README.md), and so is an FLGC expand conv the block kernel
    then runs too (it is never called on its own). Returns ``{module name: chosen kernel}``.
    """
    layers = {name: m for name, m in net.named_modules() if isinstance(m, UnequalGroupConv2d)}
    if not layers:
        return {}
    kernels = available_kernels()
    chosen = {}
    if "fused" in kernels:
        for name, block in net.named_modules():
            if isinstance(block, DeployedInvertedResidual) and block.can_fuse_depthwise():
                layer_name = f"{name}.conv.{len(block.conv) - 1}.0"
                names = [layer_name]
                if block.can_fuse_block() and f"{name}.conv.0.0" in layers:
                    names.append(f"{name}.conv.0.0")
                for layer_name in names:
                    chosen[layer_name] = "fused"
                    if layers[layer_name].kernel != "fused":
                        replace_module(net, layer_name, layers[layer_name].rebuilt("fused"))
                    del layers[layer_name]
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
        variants = {k: layer if k == layer.kernel else layer.rebuilt(k) for k in kernels}
        if channels_last:
            variants = {k: v.to(memory_format=torch.channels_last) for k, v in variants.items()}
        x = inputs[name]
        for v in variants.values():
            v(x)
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(repeats):
            for k, v in variants.items():
                times[k].append(_seconds(lambda v=v, x=x: v(x)))
        best = min(times, key=lambda k: statistics.median(times[k]))
        chosen[name] = best
        if best != layer.kernel:
            replace_module(net, name, variants[best])
    return chosen
