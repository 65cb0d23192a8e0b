"""Atomic checkpoint writes: a crash or a full disk mid-write never leaves a truncated file in place of a good one."""
from __future__ import annotations

import errno
import io
import os
from pathlib import Path
from typing import Any, Optional

import torch
from lightning_fabric.utilities.types import _PATH
from pytorch_lightning.plugins.io import TorchCheckpointIO

from flgc_lightning.errors import CheckpointError


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (disk full, quota, permissions); the previous file is intact."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file beside the target, fsync, then ``os.replace`` it into place.

    ``os.replace`` is atomic on POSIX and Windows for paths on one filesystem, so readers
    (and a resume after SIGKILL) see either the old complete file or the new complete file.
    A write that fails (no space, quota, permissions) removes its temporary file and raises
    :class:`CheckpointWriteError` naming the file and the reason; the run then stops with that message.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Optional[Any] = None) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        # Serialise in memory first: torch's zip writer turns a short write (a file-size limit, a full disk)
        # into a RuntimeError whose text depends on where the limit falls; a plain file write raises OSError.
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as fh:
                fh.write(buffer.getbuffer())
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except OSError as err:
            reason = err.strerror or str(err)
            code = f" [{errno.errorcode[err.errno]}]" if err.errno in errno.errorcode else ""
            raise CheckpointWriteError(
                f"could not write checkpoint '{path}': {reason}{code}. The previous checkpoint there (if any) is "
                "intact; free space or fix the folder's permissions, then resume from it with ckpt_path=...") from None
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)
