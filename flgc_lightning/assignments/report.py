"""``python -m flgc_lightning.assignments``: print assignment tables and draw pictures of a run."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from flgc_lightning.assignments.checkpoints import checkpoint_groups, load_checkpoints, records_from_checkpoints
from flgc_lightning.assignments.records import RECORDS_FILENAME, RecordsError, layer_records, read_records
from flgc_lightning.assignments.table import empty_groups_note, layer_table, network_summary
from flgc_lightning.training.checkpoints import load_checkpoint

PLOTS_DIRNAME = "assignment_plots"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m flgc_lightning.assignments",
        description="How FLGC channels moved between groups during training (REFERENCE.md section 4).",
    )
    parser.add_argument("run_dir", nargs="?", type=Path,
                        help=f"run directory holding {RECORDS_FILENAME} (or the records file itself)")
    parser.add_argument("--layer", type=int, help="FLGC layer number (module order, from 0); "
                        "without it: one summary line per layer")
    parser.add_argument("--filters", action="store_true", help="table of the filters instead of the inputs")
    parser.add_argument("--plot", action="store_true",
                        help="also write PNGs: with --layer its movement and block structure, else an overview")
    parser.add_argument("--from-checkpoints", type=Path, metavar="DIR",
                        help="build the records from the *.ckpt files in DIR instead of the records file")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help=f"where --plot writes (default: RUN_DIR/{PLOTS_DIRNAME})")
    args = parser.parse_args(argv)
    if args.run_dir is None and args.from_checkpoints is None:
        parser.error("give a RUN_DIR or --from-checkpoints DIR")
    return args


def load_records(args: argparse.Namespace) -> list[dict]:
    if args.from_checkpoints is not None:
        return records_from_checkpoints(args.from_checkpoints)
    path = args.run_dir if args.run_dir.is_file() else args.run_dir / RECORDS_FILENAME
    if not path.is_file():
        hint = ""
        if (args.run_dir / "checkpoints").is_dir():
            hint = f"; to use its checkpoints: --from-checkpoints {args.run_dir / 'checkpoints'}"
        raise RecordsError(f"no assignment records at '{path}' (was the model trained with FLGC layers?){hint}")
    records = read_records(path)
    if not records:
        raise RecordsError(f"'{path}' holds no records yet")
    return records


def block_ids_source(args: argparse.Namespace) -> Optional[tuple[Path, dict]]:
    """The checkpoint whose assignment the block picture shows: the latest one available."""
    if args.from_checkpoints is not None:
        return load_checkpoints(args.from_checkpoints)[-1]
    run = args.run_dir.parent if args.run_dir.is_file() else args.run_dir
    last = run / "checkpoints" / "last.ckpt"
    return (last, load_checkpoint(last)) if last.is_file() else None


def draw(args: argparse.Namespace, records: list[dict]) -> list[Path]:
    from flgc_lightning.assignments import plots  # matplotlib only when asked for

    base = args.run_dir if args.run_dir is not None else args.from_checkpoints.parent
    out = args.out or ((base.parent if base.is_file() else base) / PLOTS_DIRNAME)
    if args.layer is None:
        return [plots.plot_network_overview(records, out / "overview.png")]
    rows = layer_records(records, args.layer)
    written = [plots.plot_layer_movement(rows, out / f"layer{args.layer:02d}_movement.png")]
    source = block_ids_source(args)
    if source is None:
        print("note: no checkpoints/last.ckpt in the run directory, so no block-structure picture", file=sys.stderr)
        return written
    path, ckpt = source
    layers = checkpoint_groups(ckpt)
    if args.layer >= len(layers):
        raise RecordsError(f"checkpoint '{path}' has only {len(layers)} FLGC layers")
    layer = layers[args.layer]
    title = f"layer {args.layer} ({layer['name']}, G={layer['groups']}) at epoch {ckpt.get('epoch', '?')}"
    written.append(plots.plot_block_structure(layer["inputs"], layer["filters"], layer["groups"], title,
                                              out / f"layer{args.layer:02d}_blocks.png"))
    return written


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    records = load_records(args)
    if args.layer is None:
        print(network_summary(records))
    else:
        print(layer_table(records, args.layer, "filters" if args.filters else "inputs"))
        print(empty_groups_note(records, args.layer))
    if args.plot:
        for path in draw(args, records):
            print(f"wrote {path}")
