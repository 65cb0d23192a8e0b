"""Reads a W&B offline run file (``run-<id>.wandb``) back, for tests.

The file is W&B's record log: a 7-byte header (``:W&B``, magic, version), then LevelDB-log framing (32 KiB blocks,
each record a 7-byte header: CRC32C, length, type FULL/FIRST/MIDDLE/LAST) around protobuf messages of W&B's public
``wandb.proto.wandb_internal_pb2.Record``. wandb 0.31 has no Python reader of its own (its Go core reads them).
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
HEADER = 7


def records(path: Path):
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a record header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def read_run(path: Path) -> dict:
    """``{"id", "config": {key: value}, "history": [{key: value}, ...]}`` of one offline run file."""
    run = {"id": None, "config": {}, "history": []}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["id"] = record.run.run_id
        elif kind == "config":
            for item in record.config.update:
                run["config"][item.key] = json.loads(item.value_json)
        elif kind == "history":
            run["history"].append({"/".join(item.nested_key) or item.key: json.loads(item.value_json)
                                   for item in record.history.item})
    return run
