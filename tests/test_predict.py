"""predict.py: real CIFAR test images written as PNG files, predicted from a checkpoint and from its deployed files,
against the LightningModule's eval forward on the same images (test.py's path); bad files reported one by one."""
from __future__ import annotations

import csv
import io
import json
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, run_cli
from flgc_lightning.config import compose
from flgc_lightning.errors import UserError
from flgc_lightning.predict import checkpoint_preprocessing, load_model, predict
from flgc_lightning.training.module import ImageClassifier
from flgc_lightning.training.run import train

pytestmark = pytest.mark.slow
COUNT = 16


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cifar_subset):
    """A small CIFAR checkpoint and the first test images as PNG files.

    Two short epochs leave a network whose eval outputs hardly depend on the image (its BatchNorm statistics are
    still near their initial values), which would make any preprocessing look right. Its BatchNorm statistics are
    therefore recomputed on 256 other test images (``update_bn``): the confidences then vary from image to image."""
    from torch.optim.swa_utils import update_bn

    from flgc_lightning.data import CifarDataModule

    root = tmp_path_factory.mktemp("predict")
    threads = torch.get_num_threads()
    train(compose("train", [f"data.root={cifar_subset}", *TINY, "model.width_mult=0.25", "trainer.max_epochs=1",
                            f"run_dir={root / 'run'}"]))
    torch.set_num_threads(threads)
    path = root / "run" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    module = ImageClassifier(**checkpoint["hyper_parameters"])
    module.load_state_dict(checkpoint["state_dict"])
    datamodule = CifarDataModule(root=str(cifar_subset), download=False, limit_test=COUNT + 256, eval_batch_size=64)
    datamodule.setup()
    update_bn([datamodule.on_after_batch_transfer(b, 0)[0][COUNT:] for b in datamodule.test_dataloader()], module.net)
    checkpoint["state_dict"] = module.state_dict()
    torch.save(checkpoint, path)
    with open(cifar_subset / "cifar-10-batches-py" / "test_batch", "rb") as fh:
        batch = pickle.load(fh, encoding="latin1")
    images = root / "images"
    images.mkdir()
    for i in range(COUNT):
        pixels = np.asarray(batch["data"][i], np.uint8).reshape(3, 32, 32).transpose(1, 2, 0)
        Image.fromarray(pixels).save(images / f"test{i:02d}.png")
    return root / "run" / "checkpoints" / "last.ckpt", images


def eval_forward(checkpoint_path, datamodule) -> torch.Tensor:
    """Softmax of the LightningModule rebuilt as test.py does, on the data module's own test batches."""
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    module = ImageClassifier(**checkpoint["hyper_parameters"])
    module.load_state_dict(checkpoint["state_dict"])
    datamodule.setup()
    outputs = []
    with torch.no_grad():
        for batch in datamodule.test_dataloader():
            images, _ = datamodule.on_after_batch_transfer(batch, 0)
            outputs.append(torch.softmax(module.eval()(images), dim=1))
    return torch.cat(outputs)


def read_rows(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


def test_checkpoint_predictions_equal_the_eval_forward_and_bad_files_are_reported(trained, tmp_path, cifar_subset):
    from flgc_lightning.data import CifarDataModule

    ckpt, images = trained
    folder = tmp_path / "images"
    shutil.copytree(images, folder)
    (folder / "broken.png").write_bytes(b"not an image")
    Image.new("RGB", (40, 40)).save(folder / "big.png")
    proc = run_cli("predict.py", str(ckpt), str(folder), "--top-k", "3", "--out", str(tmp_path / "p.csv"), check=False)
    assert proc.returncode == 1  # some inputs failed...
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and any("big.png: the image is 40x40" in e and "--resize" in e for e in errors)
    assert any("broken.png: cannot read the image" in e for e in errors)
    rows = read_rows((tmp_path / "p.csv").read_text())
    assert [r["file"] for r in rows] == [str(folder / f"test{i:02d}.png") for i in range(COUNT)]  # ...the rest ran

    expected = eval_forward(ckpt, CifarDataModule(root=str(cifar_subset), download=False, limit_test=COUNT))
    confidence, index = expected.topk(3, dim=1)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert float(confidence[:, 0].max() - confidence[:, 0].min()) > 0.02  # the outputs depend on the image
    for row, conf, idx in zip(rows, confidence, index):
        assert int(row["class_index"]) == int(idx[0]) and row["class_name"] == names[idx[0]]
        assert row["top_k_indices"] == ";".join(str(int(i)) for i in idx)
        assert [float(c) for c in row["top_k_confidences"].split(";")] == pytest.approx(conf.tolist(), abs=1e-6)

    errors: list[str] = []
    assert len(predict(*load_model(ckpt), [folder / "big.png"], resize=True, errors=errors)) == 1 and not errors

    # A checkpoint from before preprocessing was recorded: the same, rebuilt from its data config.
    checkpoint = torch.load(ckpt, weights_only=True)
    recorded = checkpoint.pop("flgc_preprocessing")
    assert checkpoint_preprocessing(checkpoint) == recorded


def test_deployed_files_predict_what_the_checkpoint_predicts(trained, tmp_path):
    ckpt, images = trained
    out = tmp_path / "deployed"
    run_cli("-m", "flgc_lightning.deploy", str(ckpt), "--out", str(out), "--kernel", "blockdiag", "--onnx",
            "--export-kernel", "blockdiag")
    assert json.loads((out / "preprocessing.json").read_text()) == torch.load(ckpt, weights_only=True)["flgc_preprocessing"]
    files = sorted(images.iterdir())
    reference = predict(*load_model(ckpt), files)
    for name in ("deployed.pt2", "deployed.onnx"):
        rows = predict(*load_model(out / name), files)
        assert [r["class_index"] for r in rows] == [r["class_index"] for r in reference], name
        assert [float(r["confidence"]) for r in rows] == pytest.approx([float(r["confidence"]) for r in reference],
                                                                       abs=2e-6)
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(out / "deployed.pt2", lone)
    with pytest.raises(UserError, match="no readable preprocessing.json beside"):
        load_model(lone / "deployed.pt2")


def test_a_grayscale_digits_checkpoint_converts_and_resizes_like_its_data(tmp_path):
    from flgc_lightning.data.digits import DigitsDataModule, load_digit_images

    threads = torch.get_num_threads()
    train(compose("train", ["experiment=quickstart", "debug=limit", "num_threads=null", "logger=csv",
                            "model.width_mult=0.25", "trainer.enable_progress_bar=false", "test_after_fit=false",
                            f"run_dir={tmp_path / 'run'}"]))
    torch.set_num_threads(threads)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    datamodule = DigitsDataModule()
    preprocessing = torch.load(ckpt, weights_only=True)["flgc_preprocessing"]
    assert preprocessing == datamodule.preprocessing()  # 1 channel, 16 px, the training set's own mean/std
    assert preprocessing["classes"] == [str(d) for d in range(10)]

    # The digits' test split as 8x8 PNG files (the original images): predict.py --resize upscales them as the data does.
    small, _ = load_digit_images(8)
    big, _ = load_digit_images(16)
    order = {big[i].tobytes(): i for i in range(len(big))}
    datamodule.setup()
    test_images = datamodule.test_set.images[:COUNT]
    files = []
    for n, image in enumerate(test_images):
        path = tmp_path / f"digit{n:02d}.png"
        Image.fromarray(small[order[image.numpy().tobytes()], 0]).save(path)
        files.append(path)
    errors: list[str] = []
    assert predict(*load_model(ckpt), files[:1], errors=errors) == [] and "8x8" in errors[0]
    rows = predict(*load_model(ckpt), files, resize=True)
    datamodule = DigitsDataModule(limit_test=COUNT)
    expected = eval_forward(ckpt, datamodule)
    assert [r["class_index"] for r in rows] == expected.argmax(1).tolist()
    assert [float(r["confidence"]) for r in rows] == pytest.approx(expected.max(1).values.tolist(), abs=1e-6)
