"""Assignment records rebuilt from a directory of checkpoints (the reference's way: dumps every N epochs)."""
from __future__ import annotations

from pathlib import Path

from flgc_lightning.assignments.changes import layer_record, rule_for
from flgc_lightning.assignments.diagnostics import margins
from flgc_lightning.assignments.records import RecordsError
from flgc_lightning.training.checkpoints import load_checkpoint


def checkpoint_groups(checkpoint: dict) -> list[dict]:
    """Per FLGC layer (state_dict order = module order): name, group count, input and filter group ids."""
    state = checkpoint["state_dict"]
    rule = rule_for(checkpoint.get("hyper_parameters", {}).get("model", {}).get("assignment", "learned"))
    layers = []
    for key, logits in state.items():
        if not key.endswith(".in_assign") or key[: -len("in_assign")] + "out_assign" not in state:
            continue
        prefix = key[: -len(".in_assign")]
        out_logits = state[prefix + ".out_assign"]
        layers.append({
            "name": prefix[len("net."):] if prefix.startswith("net.") else prefix,
            "groups": int(logits.shape[1]),
            "inputs": rule(logits.float()).numpy(),
            "filters": rule(out_logits.float()).numpy(),
            "margins": (margins(logits), margins(out_logits)),
        })
    return layers


def load_checkpoints(directory: Path) -> list[tuple[Path, dict]]:
    """Every ``*.ckpt`` in ``directory`` by (epoch, step); of several with the same epoch the latest step."""
    directory = Path(directory)
    if not directory.is_dir():
        raise RecordsError(f"checkpoint directory '{directory}' does not exist")
    paths = sorted(directory.glob("*.ckpt"))
    if not paths:
        raise RecordsError(f"no *.ckpt files in '{directory}'")
    by_epoch: dict[int, tuple[Path, dict]] = {}
    for path in paths:
        ckpt = load_checkpoint(path)
        epoch = int(ckpt.get("epoch", 0))
        if epoch not in by_epoch or ckpt.get("global_step", 0) > by_epoch[epoch][1].get("global_step", 0):
            by_epoch[epoch] = (path, ckpt)
    return [by_epoch[e] for e in sorted(by_epoch)]


def records_from_checkpoints(directory: Path) -> list[dict]:
    """One record per FLGC layer and checkpoint; each row compares with the previous checkpoint."""
    records: list[dict] = []
    previous = None
    for path, ckpt in load_checkpoints(directory):
        layers = checkpoint_groups(ckpt)
        if not layers:
            raise RecordsError(f"checkpoint '{path}' has no FLGC layers (no *.in_assign/*.out_assign weights)")
        if previous is not None and [l["name"] for l in layers] != [l["name"] for l in previous]:
            raise RecordsError(f"checkpoint '{path}' has different FLGC layers than the one before it")
        for i, layer in enumerate(layers):
            prev = previous[i] if previous is not None else None
            record = layer_record(
                epoch=int(ckpt.get("epoch", 0)), step=int(ckpt.get("global_step", 0)), layer=i,
                name=layer["name"], num_groups=layer["groups"], inputs=layer["inputs"], filters=layer["filters"],
                previous_inputs=None if prev is None else prev["inputs"],
                previous_filters=None if prev is None else prev["filters"],
            )
            record["inputs"].update(layer["margins"][0])  # the logits are in the file; gradients are not
            record["filters"].update(layer["margins"][1])
            records.append(record)
        previous = layers
    return records


def last_checkpoint_groups(path: Path) -> tuple[int, list[dict]]:
    """Epoch and per-layer group ids of one checkpoint (for the block-structure picture)."""
    ckpt = load_checkpoint(path)
    return int(ckpt.get("epoch", 0)), checkpoint_groups(ckpt)
