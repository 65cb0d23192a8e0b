"""MACs counted by hand, independently of ptflops and of flgc_lightning.utils.complexity.

Forward hooks apply the textbook formulas with the conventions the reference's ptflops figures use
(REFERENCE.md section 2): a conv costs out positions x out channels x in channels / groups x k^2 (+ one add per
output for a bias), BatchNorm two per input element (one without affine terms), ReLU6 one per element, a linear
layer in x out (+ out). They reproduce the reference's dense and grouped counts exactly (tests/test_model.py), so
other networks' counts can be checked against them.
"""
from __future__ import annotations

import torch
from torch import nn

from flgc_lightning.layers import Flgc2d


def macs_by_hand(net: nn.Module, input_size=(3, 32, 32), flgc_cost: str = "dense") -> int:
    """MACs of one image. FLGC layers: ``dense`` (what the training form runs) or ``learned`` (only the
    connections inside learned groups: ones of the connection mask)."""
    total = 0

    def conv(m: nn.Conv2d, inputs, output) -> None:
        nonlocal total
        positions = output[0, 0].numel()
        k = m.kernel_size[0] * m.kernel_size[1]
        if isinstance(m, Flgc2d) and flgc_cost == "learned":
            pairs = int(m.connection_mask().detach().sum())
        elif isinstance(m, Flgc2d) and flgc_cost != "dense":
            raise ValueError(flgc_cost)
        else:
            pairs = m.out_channels * (m.in_channels // m.groups)
        total += pairs * k * positions + (m.out_channels * positions if m.bias is not None else 0)

    def batch_norm(m: nn.BatchNorm2d, inputs, output) -> None:
        nonlocal total
        total += inputs[0][0].numel() * (2 if m.affine else 1)

    def relu(m, inputs, output) -> None:
        nonlocal total
        total += output[0].numel()

    def linear(m: nn.Linear, inputs, output) -> None:
        nonlocal total
        total += m.in_features * m.out_features + (m.out_features if m.bias is not None else 0)

    hooks = []
    for m in net.modules():
        hook = (conv if isinstance(m, nn.Conv2d) else batch_norm if isinstance(m, nn.BatchNorm2d)
                else relu if isinstance(m, (nn.ReLU6, nn.ReLU)) else linear if isinstance(m, nn.Linear) else None)
        if hook is not None:
            hooks.append(m.register_forward_hook(hook))
    training = net.training
    try:
        with torch.no_grad():
            net.eval()(torch.zeros(1, *input_size, device=next(net.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
        net.train(training)
    return total
