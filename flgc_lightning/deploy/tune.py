"""Per-layer kernel choice for unequal-group convs, by timing both kernels on this machine."""
from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from flgc_lightning.deploy.grouped import UnequalGroupConv2d


def _median_seconds(fn, repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


@torch.no_grad()
def choose_kernels(net: nn.Module, batch: int = 64, channels_last: bool = True, repeats: int = 5) -> dict[str, str]:
    """Replace every :class:`UnequalGroupConv2d` by its faster kernel variant (same outputs).

    Inputs are captured from one forward pass at ``batch``; both variants are timed interleaved.
    Returns ``{module name: chosen kernel}``.
    """
    layers = {name: m for name, m in net.named_modules() if isinstance(m, UnequalGroupConv2d)}
    if not layers:
        return {}
    inputs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: inputs.__setitem__(name, args[0]))
             for name, m in layers.items()]
    x = torch.randn(batch, 3, 32, 32)
    net(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
    for h in hooks:
        h.remove()
    chosen = {}
    for name, layer in layers.items():
        other_kind = "blockdiag" if layer.kernel == "padded" else "padded"
        other = layer.rebuilt(other_kind)
        if channels_last:
            other = other.to(memory_format=torch.channels_last)
        x = inputs[name]
        times = {layer.kernel: [], other_kind: []}
        for _ in range(repeats):
            times[layer.kernel].append(_median_seconds(lambda: layer(x), 1))
            times[other_kind].append(_median_seconds(lambda: other(x), 1))
        best = min(times, key=lambda k: statistics.median(times[k]))
        chosen[name] = best
        if best != layer.kernel:
            parent_name, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent_name) if parent_name else net, child, other)
    return chosen
