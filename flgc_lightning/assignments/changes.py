"""Group ids of FLGC assignment logits and the per-group changes between two assignments.

One record describes one FLGC layer at one epoch (REFERENCE.md section 4): for its
input channels and for its filters, every group's size and how many channels it
lost and gained since the previous record, plus the groups left half-empty.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from flgc_lightning.layers.flgc import Flgc2d, balanced_group_ids, group_ids


# Group id per channel (argmax of the row-wise softmax, first index on ties): the layer's own rule.
assignment_groups = group_ids


def rule_for(assignment: str) -> Callable[[Tensor], Tensor]:
    """The group-id rule of a model's ``assignment`` setting (``balanced`` or not)."""
    return balanced_group_ids if assignment == "balanced" else group_ids


@torch.no_grad()
def layer_groups_many(layers: Sequence[Flgc2d]) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(input ids, filter ids)`` of every layer, by each layer's own rule, with one device-to-host copy."""
    ids = [side for layer in layers for side in (layer.input_groups(), layer.filter_groups())]
    if not ids:
        return []
    flat = torch.cat(ids).cpu().numpy()
    splits = np.cumsum([len(t) for t in ids])[:-1]
    parts = np.split(flat, splits)
    return list(zip(parts[0::2], parts[1::2]))


def side_change(previous: Optional[np.ndarray], current: np.ndarray, num_groups: int) -> dict:
    """Sizes, removed/added per group and moved channels of one side (inputs or filters).

    ``total_diff`` is the reference's "Total diff.": the sum of absolute changes of the
    one-hot matrix, i.e. twice the number of channels that changed group. Without a
    previous assignment (the first record) nothing has moved.
    """
    current = np.asarray(current, dtype=np.int64)
    sizes = np.bincount(current, minlength=num_groups)
    if previous is None:
        removed = added = np.zeros(num_groups, dtype=np.int64)
    else:
        previous = np.asarray(previous, dtype=np.int64)
        if previous.shape != current.shape:
            raise ValueError(f"assignment of {previous.size} channels cannot be compared with {current.size}")
        moved_mask = previous != current
        removed = np.bincount(previous[moved_mask], minlength=num_groups)
        added = np.bincount(current[moved_mask], minlength=num_groups)
    moved = int(added.sum())
    return {
        "sizes": sizes.tolist(),
        "removed": removed.tolist(),
        "added": added.tolist(),
        "moved": moved,
        "total_diff": 2 * moved,
    }


def empty_groups(input_sizes: list[int], filter_sizes: list[int]) -> dict:
    """Groups with filters but no inputs (those filters output only their bias) or the reverse (unused inputs)."""
    pairs = list(zip(input_sizes, filter_sizes))
    return {
        "filters_without_inputs": [g for g, (i, f) in enumerate(pairs) if f > 0 and i == 0],
        "inputs_without_filters": [g for g, (i, f) in enumerate(pairs) if i > 0 and f == 0],
    }


def layer_record(
    *,
    epoch: int,
    step: int,
    layer: int,
    name: str,
    num_groups: int,
    inputs: np.ndarray,
    filters: np.ndarray,
    previous_inputs: Optional[np.ndarray] = None,
    previous_filters: Optional[np.ndarray] = None,
) -> dict:
    """The record of one layer at one epoch (one JSON line of ``assignments.jsonl``).

    ``baseline`` is true for a record with no previous assignment (the initial one, epoch -1).
    """
    ins = side_change(previous_inputs, inputs, num_groups)
    outs = side_change(previous_filters, filters, num_groups)
    empty = empty_groups(ins["sizes"], outs["sizes"])
    return {
        "epoch": int(epoch),
        "step": int(step),
        "layer": int(layer),
        "name": name,
        "in_channels": int(len(inputs)),
        "out_channels": int(len(filters)),
        "groups": int(num_groups),
        "baseline": previous_inputs is None,
        "inputs": ins,
        "filters": outs,
        "empty_groups": empty,
        "num_empty_groups": len(empty["filters_without_inputs"]) + len(empty["inputs_without_filters"]),
    }
