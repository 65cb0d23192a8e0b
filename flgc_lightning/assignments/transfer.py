"""A trained run's FLGC groups copied into a fresh network: the retraining controls.

Learned groups retrained from scratch (``model.groups_from=CKPT``) against the same group sizes with random
membership (``model.groups_shuffle=true``) separate "which channels share a group" from "how big the groups
are" (Liu et al., "Rethinking the value of network pruning"; Frankle et al., "Pruning neural networks at
initialization: why are we missing the mark?"). The groups are read from the checkpoint's assignment
logits by the source layer's own rule and written into the new network's frozen logits as one-hot rows,
so its weights start fresh and only the grouping is inherited.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from flgc_lightning.assignments.checkpoints import checkpoint_groups
from flgc_lightning.errors import ConfigError
from flgc_lightning.layers.flgc import Flgc2d
from flgc_lightning.training.checkpoints import load_checkpoint


def shuffled(ids: np.ndarray, generator: torch.Generator) -> np.ndarray:
    """The same group sizes, the channels dealt to them at random."""
    return np.asarray(ids)[torch.randperm(len(ids), generator=generator).numpy()]


@torch.no_grad()
def transfer_groups(net: nn.Module, path: str | Path, shuffle: bool = False, seed: int = 0) -> list[dict]:
    """Give every FLGC layer of ``net`` the groups its namesake has in checkpoint ``path`` (shuffled per layer
    and side with a generator seeded by ``seed`` and the layer's position if ``shuffle``). Returns per layer
    the name and the group sizes; raises :class:`ConfigError` when the networks don't match."""
    checkpoint = load_checkpoint(path)  # a file: read through the same checks as every checkpoint
    source = {layer["name"]: layer for layer in checkpoint_groups(checkpoint)}
    layers = [(name, m) for name, m in net.named_modules() if isinstance(m, Flgc2d)]
    problems = []
    for name, layer in layers:
        src = source.get(name)
        if src is None:
            problems.append(f"{name}: no FLGC layer of that name in the checkpoint")
        elif (src["groups"], len(src["inputs"]), len(src["filters"])) != (layer.num_groups, layer.in_channels,
                                                                           layer.out_channels):
            problems.append(f"{name}: the checkpoint's layer has {len(src['inputs'])} inputs, {len(src['filters'])} "
                            f"filters, {src['groups']} groups; this one {layer.in_channels}, {layer.out_channels}, "
                            f"{layer.num_groups}")
    if not layers or problems:
        problems = problems or ["this network has no FLGC layers"]
        raise ConfigError(f"invalid configuration:\n  - model.groups_from={path}: the groups don't fit this "
                          "network (same model settings as the run that learned them?):\n    - "
                          + "\n    - ".join(problems))
    done = []
    for index, (name, layer) in enumerate(layers):
        inputs, filters = source[name]["inputs"], source[name]["filters"]
        if shuffle:
            generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + index)
            inputs, filters = shuffled(inputs, generator), shuffled(filters, generator)
        for logits, ids in ((layer.in_assign, inputs), (layer.out_assign, filters)):
            one_hot = torch.zeros(logits.shape, dtype=logits.dtype)
            one_hot[torch.arange(len(ids)), torch.as_tensor(ids, dtype=torch.long)] = 1.0
            logits.copy_(one_hot)
        done.append({"name": name, "input_sizes": np.bincount(inputs, minlength=layer.num_groups).tolist(),
                     "filter_sizes": np.bincount(filters, minlength=layer.num_groups).tolist()})
    return done
