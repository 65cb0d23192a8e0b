"""Text tables of assignment records: the reference's per-layer table and a per-layer network summary."""
from __future__ import annotations

from typing import Sequence

from flgc_lightning.assignments.records import layer_records

SIDES = ("inputs", "filters")


def epoch_label(record: dict) -> str:
    return "init" if record["epoch"] < 0 else str(record["epoch"])


def _layout(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> list[str]:
    """The first ``left`` columns left-aligned, the others right-aligned, two spaces between columns."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return lines


def layer_table(records: Sequence[dict], layer: int, side: str = "inputs") -> str:
    """REFERENCE.md section 4: one row per epoch, one ``-removed/+added/size`` cell per group, "Total diff."."""
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    rows_in = layer_records(records, layer)
    first = rows_in[0]
    groups = first["groups"]
    header = ["epoch", *(f"g{g}" for g in range(groups)), "Total diff."]
    rows = []
    for r in rows_in:
        s = r[side]
        cells = [f"-{rm}/+{ad}/{sz}" for rm, ad, sz in zip(s["removed"], s["added"], s["sizes"])]
        rows.append([epoch_label(r), *cells, str(s["total_diff"])])
    title = (f"layer {layer} ({first['name']}, {first['in_channels']}->{first['out_channels']} channels, "
             f"G={groups}): {side}, cells -removed/+added/size vs the previous row")
    return "\n".join([title, *_layout(header, rows)])


def network_summary(records: Sequence[dict]) -> str:
    """One line per FLGC layer: shape, moves in the last epoch and in all, empty groups, last sizes."""
    layers = sorted({r["layer"] for r in records})
    epochs = sorted({r["epoch"] for r in records})
    span = f"{epoch_label({'epoch': epochs[0]})}..{epoch_label({'epoch': epochs[-1]})}" if epochs else "none"
    title = (f"{len(layers)} FLGC layers, epochs {span}; "
             "moved = channels that changed group (last epoch / all epochs)")
    header = ["layer", "module", "in->out", "G", "last", "moved inputs", "moved filters", "empty",
              "input sizes", "filter sizes"]
    rows = []
    for layer in layers:
        rs = layer_records(records, layer)
        last = rs[-1]
        rows.append([
            str(layer), last["name"], f"{last['in_channels']}->{last['out_channels']}", str(last["groups"]),
            epoch_label(last),
            f"{last['inputs']['moved']}/{sum(r['inputs']['moved'] for r in rs)}",
            f"{last['filters']['moved']}/{sum(r['filters']['moved'] for r in rs)}",
            str(last["num_empty_groups"]),
            " ".join(map(str, last["inputs"]["sizes"])),
            " ".join(map(str, last["filters"]["sizes"])),
        ])
    return "\n".join([title, *_layout(header, rows, left=2)])


def empty_groups_note(records: Sequence[dict], layer: int) -> str:
    """Which groups of the layer's last record have filters but no inputs, or inputs but no filters."""
    last = layer_records(records, layer)[-1]
    e = last["empty_groups"]
    parts = []
    if e["filters_without_inputs"]:
        parts.append("filters but no inputs: " + ", ".join(f"g{g}" for g in e["filters_without_inputs"]))
    if e["inputs_without_filters"]:
        parts.append("inputs but no filters: " + ", ".join(f"g{g}" for g in e["inputs_without_filters"]))
    return f"empty groups at epoch {epoch_label(last)}: " + ("; ".join(parts) if parts else "none")
