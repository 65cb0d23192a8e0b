"""Parameter and MAC counts with ptflops (``backend='pytorch'``), FLGC-aware.

ptflops matches module types exactly, so ``Flgc2d`` (an ``nn.Conv2d`` subclass)
needs its own hook. Three honest views of an FLGC layer's cost:

- ``"dense"``: what the training form really runs (full conv on a masked weight);
- ``"nominal"``: the uniform-group figure the reference reports (dense / G);
- ``"learned"``: the learned unequal groups, sum_g |in_g| * |out_g| * k^2 * H * W,
  which is what a deployed network (:mod:`flgc_lightning.deploy`) costs.
"""
from __future__ import annotations

import copy
from typing import Literal

from ptflops import get_model_complexity_info
from torch import nn

from flgc_lightning.layers import Flgc2d

FlgcCost = Literal["dense", "nominal", "learned"]


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def learned_connections(layer: Flgc2d) -> int:
    """Number of (filter, input channel) pairs that share a learned group: sum_g |in_g| * |out_g|."""
    in_sizes, out_sizes = layer.group_sizes()
    return int((in_sizes * out_sizes).sum())


def group_size_imbalance(model: nn.Module) -> float | None:
    """Mean over FLGC layers and sides (inputs, filters) of largest group / mean group size.

    1.0 means equal groups (balanced FLGC); random N(0, 1) assignments give about 1.5 to 2.
    ``None`` without FLGC layers.
    """
    ratios = []
    for layer in (m for m in model.modules() if isinstance(m, Flgc2d)):
        for sizes in layer.group_sizes():
            ratios.append(float(sizes.max()) / float(sizes.float().mean()))
    return sum(ratios) / len(ratios) if ratios else None


def _flgc_hook(cost: FlgcCost):
    def hook(module: Flgc2d, inputs, output) -> None:
        batch = output.shape[0]
        positions = output[0, 0].numel()
        kernel = module.kernel_size[0] * module.kernel_size[1]
        dense = module.in_channels * module.out_channels
        pairs = {"dense": dense, "nominal": dense / module.num_groups, "learned": learned_connections(module)}[cost]
        macs = pairs * kernel * positions
        if module.bias is not None:
            macs += module.out_channels * positions
        module.__flops__ += int(macs * batch)

    return hook


def count_macs(model: nn.Module, input_size=(3, 32, 32), flgc_cost: FlgcCost = "dense") -> int:
    """MACs of one ``input_size`` image, counted by ptflops on a CPU copy in eval mode."""
    probe = copy.deepcopy(model).cpu().eval()
    # ptflops looks hooks up by exact type: every FLGC layer class present (BalancedFlgc2d, future
    # subclasses) needs its own entry, or its convs count 0 MACs.
    flgc_types = {type(m) for m in probe.modules() if isinstance(m, Flgc2d)}
    macs, _ = get_model_complexity_info(
        probe,
        tuple(input_size),
        as_strings=False,
        print_per_layer_stat=False,
        backend="pytorch",
        custom_modules_hooks={t: _flgc_hook(flgc_cost) for t in flgc_types},
        backend_specific_config={"count_functional": False},
    )
    return int(macs)


def complexity_summary(model: nn.Module, input_size=(3, 32, 32)) -> dict[str, int]:
    """Params and MACs; FLGC models also get their nominal and learned-group MACs."""
    summary = {"params": count_parameters(model), "macs": count_macs(model, input_size, "dense")}
    if any(isinstance(m, Flgc2d) for m in model.modules()):
        summary["macs_nominal"] = count_macs(model, input_size, "nominal")
        summary["macs_learned"] = count_macs(model, input_size, "learned")
    return summary


def format_millions(value: float) -> str:
    return f"{value / 1e6:.2f} M"
