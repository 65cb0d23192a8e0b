"""Read and fetch CIFAR-10/100 in the official ``cifar-*-batches-py`` / ``cifar-100-python`` layout.

torchvision's ``CIFAR10`` verifies archive checksums and refuses copies that differ
(e.g. a subset). We read the pickled batches ourselves and use torchvision only
to download, into a temporary folder, so a failed download writes nothing.
"""
from __future__ import annotations

import pickle
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np


# What the official CIFAR batch files (and copies written by numpy 1 or 2) reference: arrays, their dtype, and
# ``_codecs.encode`` (Python 3 pickles of bytes). A pickle may name any callable; anything else is refused.
_PICKLE_GLOBALS = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                   ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
                   ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles data only: a data file must not decide what code runs."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"it references {module}.{name}; a CIFAR batch file holds only arrays, "
                                         "lists and strings")
        return super().find_class(module, name)


def load_batch_file(path: Path) -> dict:
    """One pickled CIFAR batch (``data``, labels, ...), with only array reconstruction allowed."""
    with open(path, "rb") as fh:
        return _BatchUnpickler(fh, encoding="latin1").load()


@dataclass(frozen=True)
class CifarLayout:
    name: str  # "cifar10" | "cifar100"
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: str
    url: str
    archive: str
    md5: str
    num_classes: int


CIFAR10 = CifarLayout(
    "cifar10", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
    "labels", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-python.tar.gz",
    "c58f30108f718f92721af3b95e74349a", 10,
)
CIFAR100 = CifarLayout(
    "cifar100", "cifar-100-python", ("train",), ("test",), "fine_labels",
    "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "cifar-100-python.tar.gz",
    "eb9058c3a382ffc7106e4002c42a8d85", 100,
)


class DataNotFoundError(FileNotFoundError):
    """The dataset is neither on disk nor downloadable; the message says where to put it."""


def find_folder(root: str | Path, layout: CifarLayout) -> Path | None:
    """``root/<folder>`` or ``root`` itself if it already is the batches folder."""
    root = Path(root).expanduser()
    for candidate in (root / layout.folder, root):
        if all((candidate / f).is_file() for f in layout.train_files + layout.test_files):
            return candidate
    return None


def _missing_message(root: Path, layout: CifarLayout, reason: str) -> str:
    files = ", ".join(layout.train_files + layout.test_files)
    fetch = "run again online" if "download failed" in reason else "run online with data.download=true"
    return (
        f"{layout.name} not found under '{root}' and {reason}. Put the official python-version files "
        f"({files}) in '{root / layout.folder}', set data.root to a folder that holds '{layout.folder}', "
        f"or {fetch} ({layout.url})."
    )


def ensure_downloaded(root: str | Path, layout: CifarLayout, download: bool) -> Path:
    """Return the batches folder, downloading it first if allowed and needed."""
    root = Path(root).expanduser()
    found = find_folder(root, layout)
    if found is not None:
        return found
    if not download:
        raise DataNotFoundError(_missing_message(root, layout, "data.download=false"))
    from torchvision.datasets.utils import download_and_extract_archive

    with tempfile.TemporaryDirectory(prefix=f"{layout.name}-download-") as tmp:
        try:
            download_and_extract_archive(layout.url, tmp, filename=layout.archive, md5=layout.md5)
        except Exception as err:  # offline, proxy, truncated archive...
            raise DataNotFoundError(_missing_message(root, layout, f"the download failed ({err})")) from err
        root.mkdir(parents=True, exist_ok=True)
        shutil.move(str(Path(tmp) / layout.folder), str(root / layout.folder))
    return root / layout.folder


def load_split(folder: Path, layout: CifarLayout, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """Images as ``N x 3 x 32 x 32`` uint8 (the files' own plane order) and labels as int64."""
    images, labels = [], []
    for name in layout.train_files if train else layout.test_files:
        path = folder / name
        try:
            entry = load_batch_file(path)
            images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(entry[layout.label_key])
        except Exception as err:
            raise DataNotFoundError(f"could not read {layout.name} file '{path}': {err}") from err
    return np.concatenate(images), np.asarray(labels, dtype=np.int64)
