"""Atomic checkpoint writes: a crash mid-write never leaves a truncated file in place of a good one."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch
from lightning_fabric.utilities.types import _PATH
from pytorch_lightning.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file beside the target, fsync, then ``os.replace`` it into place.

    ``os.replace`` is atomic on POSIX and Windows for paths on one filesystem, so readers
    (and a resume after SIGKILL) see either the old complete file or the new complete file.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Optional[Any] = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as fh:
                torch.save(checkpoint, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
