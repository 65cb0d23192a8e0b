"""CUDA graphs for a network's training forward and backward, without ``torch.compile``.

A CIFAR MobileNetV2 step launches hundreds of small kernels (FLGC adds a few per layer for its masks),
and on a fast GPU the host's launching, not the GPU, sets the pace: measured on an H200, 21-31 ms per
batch-128 step in eager mode while the GPU was mostly idle (benchmarks/gpu_session.py). A CUDA graph
records the kernels of one forward and one backward once and replays them with one launch each.

:class:`GraphedTraining` captures them at the first training batch with
``torch.cuda.make_graphed_callables`` (under the same autocast dtype as the step, autocast's cache off,
as graph capture requires), and replays them for every training batch of the same shape. Other shapes
(an epoch's last, smaller batch) and evaluation run the network as usual, on the same parameters. The
BatchNorm statistics that the capture's warm-up passes update are put back, so capturing changes no
state. The optimizer step, the loss and the metrics stay outside the graph.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn


class GraphedTraining:
    """Calls ``net`` through CUDA graphs in training mode; a plain call otherwise."""

    def __init__(self, net: nn.Module, warmup: int = 3) -> None:
        self.net, self.warmup = net, warmup
        self.graphed: Optional[Callable[[Tensor], Tensor]] = None
        self.key: Optional[tuple] = None

    @staticmethod
    def _key(x: Tensor) -> tuple:
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        return tuple(x.shape), x.stride(), x.dtype, x.device, dtype

    def __call__(self, x: Tensor) -> Tensor:
        if not (self.net.training and x.is_cuda and torch.is_grad_enabled()):
            return self.net(x)
        if self.graphed is None:
            self._capture(x)
        if self._key(x) != self.key:
            return self.net(x)
        return self.graphed(x)

    def _capture(self, x: Tensor) -> None:
        buffers = {name: b.detach().clone() for name, b in self.net.named_buffers()}
        autocast = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        sample = x.detach().clone()  # same shape, strides and memory format
        with torch.autocast("cuda", dtype=autocast or torch.float32, enabled=autocast is not None,
                            cache_enabled=False):
            torch.cuda.make_graphed_callables(self.net, (sample,), num_warmup_iters=self.warmup)
        # make_graphed_callables puts the graphed forward on the module itself; keep it here instead, so that
        # other shapes and eval mode keep calling the network's own forward.
        self.graphed = self.net.forward
        del self.net.forward
        with torch.no_grad():  # the warm-up and capture passes ran the network in training mode
            for name, b in self.net.named_buffers():
                b.copy_(buffers[name])
        self.key = self._key(x)
