"""What ``predict.py`` does: classify image files with a checkpoint or a deployed network, as evaluation would.

The preprocessing is the model's own, never guessed: image size, channels (grayscale or colour), normalisation
mean/std and class names come from the checkpoint (``flgc_preprocessing``, recorded by every checkpoint train.py
writes; older checkpoints: computed from their data config, which needs the training data) or, for a deployed
``.pt2`` / ``.onnx`` file, from the ``preprocessing.json`` that ``python -m flgc_lightning.deploy`` writes beside it.
Pixels are normalised by the same function evaluation batches go through, so a checkpoint's predictions are those of
the LightningModule's eval forward (and test.py) on the same images.

Images are converted to the model's channels (as the image-folder data does). One whose size differs from the
model's is an error unless ``--resize`` (bilinear, as the digits data and image folders resize). A file that cannot
be used gets one ``error:`` line on stderr; the others are still predicted, and the exit code is 1.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from flgc_lightning.errors import UserError

PREPROCESSING_FILE = "preprocessing.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
COLUMNS = ("file", "class_index", "class_name", "confidence", "top_k_indices", "top_k_names", "top_k_confidences")


def checkpoint_preprocessing(checkpoint: dict) -> dict:
    """A checkpoint's recorded preprocessing; for checkpoints older than the record, rebuilt from its data config."""
    if checkpoint.get("flgc_preprocessing"):
        return dict(checkpoint["flgc_preprocessing"])
    from flgc_lightning.training.schema import instantiate_checked

    data = (checkpoint.get("flgc_config") or {}).get("data")
    if not data:
        raise UserError("the checkpoint records neither its preprocessing nor its data config, so the image size, "
                        "channels and normalisation it expects are unknown")
    datamodule = instantiate_checked(data, "data")
    datamodule.prepare_data()  # a missing dataset says where it is expected
    return datamodule.preprocessing()


def write_preprocessing(checkpoint_path: str | Path, folder: str | Path) -> Path:
    """``preprocessing.json`` beside a deployed network (``python -m flgc_lightning.deploy``)."""
    from flgc_lightning.training.checkpoints import load_checkpoint

    path = Path(folder) / PREPROCESSING_FILE
    path.write_text(json.dumps(checkpoint_preprocessing(load_checkpoint(checkpoint_path)), indent=2) + "\n")
    return path


def load_model(path: Path, preprocessing_path: Optional[Path] = None) -> tuple[Callable, dict]:
    """``(logits of a normalised N x C x H x W float batch, preprocessing)`` of a checkpoint or deployed file."""
    if not path.is_file():
        raise UserError(f"model '{path}' does not exist (give a train.py .ckpt, or deployed.pt2 / deployed.onnx)")
    suffix = path.suffix.lower()
    if suffix == ".ckpt":
        from flgc_lightning.deploy.checkpoint import load_trained_network
        from flgc_lightning.training.checkpoints import load_checkpoint

        net, _ = load_trained_network(path)  # the weights evaluation uses (the average, with callbacks=ema)
        return (lambda x: net(x)), checkpoint_preprocessing(load_checkpoint(path))
    if suffix not in (".pt2", ".onnx"):
        raise UserError(f"model '{path}': expected a train.py checkpoint (.ckpt) or a deployed network (.pt2, .onnx) "
                        "written by python -m flgc_lightning.deploy")
    preprocessing_path = preprocessing_path or path.with_name(PREPROCESSING_FILE)
    try:
        preprocessing = json.loads(preprocessing_path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"no readable {preprocessing_path.name} beside '{path}' ({err}): the deployed file does not say "
                        "how to preprocess images. Deploy again (python -m flgc_lightning.deploy CKPT --out DIR "
                        "writes it), or pass --preprocessing FILE") from None
    if suffix == ".pt2":
        from flgc_lightning.deploy.program_file import load_program

        program = load_program(path)  # checked first: torch.export.load alone runs code a file chooses
        return (lambda x: program(x.contiguous(memory_format=torch.channels_last))), preprocessing
    from flgc_lightning.deploy.onnxruntime_ops import session

    try:
        ort = session(str(path))
    except Exception as err:  # noqa: BLE001
        raise UserError(f"'{path}' cannot be loaded by ONNX Runtime: {str(err)[:200]}") from None
    return (lambda x: torch.from_numpy(ort.run(None, {"images": x.numpy()})[0])), preprocessing


def image_files(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """The image files named or found (recursively, by extension) in the inputs; and errors for missing inputs."""
    files, errors = [], []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            errors.append(f"{item}: no such file or folder")
    return files, errors


def read_image(path: Path, preprocessing: dict, resize: bool) -> torch.Tensor:
    """uint8 C x H x W pixels of one file in the model's channels and size; ``ValueError`` with the reason if unusable."""
    from PIL import Image, UnidentifiedImageError

    mode = "L" if preprocessing["channels"] == 1 else "RGB"
    size = (int(preprocessing["width"]), int(preprocessing["height"]))
    try:
        with Image.open(path) as image:
            image = image.convert(mode)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot read the image ({type(err).__name__}: {str(err)[:120]})") from None
    if image.size != size:
        if not resize:
            raise ValueError(f"the image is {image.size[0]}x{image.size[1]} and the model takes {size[0]}x{size[1]} "
                             "images (add --resize to resize it)")
        image = image.resize(size, Image.BILINEAR)
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))
    return pixels[None] if pixels.ndim == 2 else pixels.permute(2, 0, 1).contiguous()


def predict(model: Callable, preprocessing: dict, files: list[Path], top_k: int = 5, resize: bool = False,
            batch_size: int = 64, errors: Optional[list[str]] = None) -> list[dict]:
    """One row per usable file (class, confidence, top-k); ``errors`` collects one line per unusable file."""
    from flgc_lightning.data.augment import normalize

    errors = [] if errors is None else errors
    mean = torch.tensor(preprocessing["mean"], dtype=torch.float32)
    std = torch.tensor(preprocessing["std"], dtype=torch.float32)
    names = preprocessing.get("classes")
    rows = []
    for start in range(0, len(files), batch_size):
        batch, kept = [], []
        for path in files[start:start + batch_size]:
            try:
                batch.append(read_image(path, preprocessing, resize))
                kept.append(path)
            except ValueError as err:
                errors.append(f"{path}: {err}")
        if not batch:
            continue
        with torch.inference_mode():
            probs = torch.softmax(model(normalize(torch.stack(batch), mean, std)).float(), dim=1)
        k = min(top_k, probs.shape[1])
        confidence, index = probs.topk(k, dim=1)
        for path, conf, idx in zip(kept, confidence.tolist(), index.tolist()):
            label = lambda i: names[i] if names and i < len(names) else ""  # noqa: E731
            rows.append({"file": str(path), "class_index": idx[0], "class_name": label(idx[0]),
                         "confidence": f"{conf[0]:.6f}", "top_k_indices": ";".join(map(str, idx)),
                         "top_k_names": ";".join(label(i) for i in idx),
                         "top_k_confidences": ";".join(f"{c:.6f}" for c in conf)})
    return rows


def run(args: argparse.Namespace) -> int:
    if args.top_k < 1 or args.batch_size < 1:
        raise UserError("--top-k and --batch-size must be positive integers")
    torch.set_grad_enabled(False)
    model, preprocessing = load_model(Path(args.model).expanduser(),
                                      Path(args.preprocessing).expanduser() if args.preprocessing else None)
    files, errors = image_files(args.inputs)
    if not files and not errors:
        raise UserError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {' '.join(args.inputs)}")
    rows = predict(model, preprocessing, files, args.top_k, args.resize, args.batch_size, errors)
    out = open(args.out, "w", newline="") if args.out != "-" else sys.stdout
    try:
        writer = csv.DictWriter(out, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    finally:
        if out is not sys.stdout:
            out.close()
    for line in errors:
        print(f"error: {line}", file=sys.stderr)
    if errors:
        print(f"{len(rows)} of {len(rows) + len(errors)} inputs predicted; {len(errors)} failed", file=sys.stderr)
    return 1 if errors else 0


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python predict.py", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a train.py checkpoint (.ckpt), or deployed.pt2 / deployed.onnx written by "
                                      "python -m flgc_lightning.deploy (with preprocessing.json beside it)")
    parser.add_argument("inputs", nargs="+", help="image files and/or folders (searched recursively)")
    parser.add_argument("--out", default="-", help="CSV file to write (default: standard output)")
    parser.add_argument("--top-k", type=int, default=5, help="classes listed per image (default 5)")
    parser.add_argument("--resize", action="store_true", help="resize images whose size differs from the model's "
                                                              "(bilinear) instead of reporting them")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--preprocessing", default=None,
                        help="preprocessing.json for a deployed file (default: the one beside it)")
    args = parser.parse_args(argv)
    from flgc_lightning.cli import report_user_errors

    raise SystemExit(report_user_errors(lambda: run(args)))
