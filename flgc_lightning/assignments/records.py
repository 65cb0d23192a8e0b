"""Reading and writing the assignment records file (JSON lines, one record per layer and epoch)."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterable

from flgc_lightning.errors import UserError

RECORDS_FILENAME = "assignments.jsonl"


class RecordsError(UserError):
    """The records file is missing or unreadable, or a layer asked for is not in it."""


def append_records(path: Path, records: Iterable[dict]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
        fh.flush()


def rewrite_records(path: Path, records: Iterable[dict]) -> None:
    """Replace the file atomically (temp file + ``os.replace``): a crash leaves the old or the new file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_records(path: Path) -> list[dict]:
    """All records in file order. An unfinished last line (a run killed mid-write) is ignored."""
    path = Path(path)
    if not path.is_file():
        raise RecordsError(f"no assignment records at '{path}'")
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):  # no trailing newline: the writer was interrupted
                break
            raise RecordsError(f"'{path}' line {number} is not a JSON record ({err.msg})") from None
        if not isinstance(record, dict) or not {"epoch", "layer", "inputs", "filters"} <= record.keys():
            raise RecordsError(f"'{path}' line {number} is not an assignment record")
        records.append(record)
    return records


def layer_records(records: Iterable[dict], layer: int) -> list[dict]:
    """One layer's records by epoch; an error that lists the valid layers if it has none."""
    records = list(records)
    chosen = [r for r in records if r["layer"] == layer]
    if not chosen:
        layers = sorted({r["layer"] for r in records})
        valid = f"layers {layers[0]}..{layers[-1]}" if layers else "no layers"
        raise RecordsError(f"layer {layer} has no records (the records hold {valid})")
    return sorted(chosen, key=lambda r: r["epoch"])
