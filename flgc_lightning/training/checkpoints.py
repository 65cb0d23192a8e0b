"""Reading our Lightning checkpoints safely, with errors that name the file and the problem."""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from flgc_lightning.errors import CheckpointError
from flgc_lightning.training.file_config import check_checkpoint

REQUIRED_KEYS = ("state_dict", "hyper_parameters", "flgc_config")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` on CPU, then check it is one of ours and that its saved configs
    build only allowed code (:mod:`flgc_lightning.training.file_config`), whatever reads it next.

    Checkpoints hold plain types only, so no trusted (pickle) loading is ever needed.
    """
    path = Path(str(path)).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' is not a file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError, OSError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"checkpoint '{path}' cannot be read: it is truncated, corrupt or not a PyTorch checkpoint "
            f"({first_line[:200]})"
        ) from err
    if not isinstance(checkpoint, dict) or any(k not in checkpoint for k in REQUIRED_KEYS):
        missing = [k for k in REQUIRED_KEYS if not isinstance(checkpoint, dict) or k not in checkpoint]
        raise CheckpointError(
            f"checkpoint '{path}' was not written by flgc-lightning's train.py (missing {', '.join(missing)})"
        )
    check_checkpoint(checkpoint, f"checkpoint '{path}'")
    return checkpoint
