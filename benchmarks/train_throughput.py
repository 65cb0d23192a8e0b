"""Training throughput: the data pipeline alone and whole training steps, old pipeline vs new, in one run.

    python benchmarks/train_throughput.py [--data ../shared/data/cifar10-subset] [--batch 128] [--steps 4]

*Old*: the pipeline before batches were planned per epoch: one image at a time through PIL
(RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize), each seeded by
``(seed, epoch, index)`` (SeedSequence + ``fork_rng`` + ``manual_seed``), in a DataLoader with
worker processes. It is rebuilt here for the comparison; the package no longer has it.
*New*: :class:`flgc_lightning.data.CifarDataModule`'s default: uint8 images resident on the training
device, batches gathered and augmented whole there (``on_after_batch_transfer``).

Rows:
1. data pipeline alone, images/s, one thread (``--threads`` for the steps); the target is 50,000 images/s.
2. training steps (forward, backward, SGD) of dense / standard G=8 / FLGC G=8 MobileNetV2 fed by each
   pipeline: images/s and the data share of the step (target < 2 % for the new pipeline, FLGC).
3. with a CUDA GPU: the same on the GPU (channels_last, bf16-mixed), a full CIFAR-sized epoch (50,000
   images of the same shape) and the 400-epoch recipe's projected time.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flgc_lightning.data import CifarDataModule, ResidentImages  # noqa: E402
from flgc_lightning.data.cifar import CIFAR_MEAN, CIFAR_STD  # noqa: E402
from flgc_lightning.models import MobileNetV2  # noqa: E402

MODELS = {"dense": dict(groups=1), "standard G=8": dict(groups=8), "FLGC G=8": dict(groups=8, use_flgc=True)}


# -- the old pipeline, for comparison -------------------------------------------------------------
class OldSeededCifar(torch.utils.data.Dataset):
    """One image per call through PIL transforms, seeded by (seed, epoch, index) like the old SeededAugmentation."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, seed: int = 0, epoch: int = 0) -> None:
        from torchvision import transforms

        self.images, self.labels, self.seed, self.epoch = images, labels, seed, epoch
        self.transform = transforms.Compose([
            transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
            transforms.Normalize(CIFAR_MEAN, CIFAR_STD)])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        from PIL import Image

        seed = int(np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(2, np.uint64)[0] >> np.uint64(1))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


def old_loader(images: np.ndarray, labels: np.ndarray, batch: int, workers: int) -> torch.utils.data.DataLoader:
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    return torch.utils.data.DataLoader(OldSeededCifar(images, labels), batch_size=batch, sampler=order.tolist(),
                                       num_workers=workers, persistent_workers=workers > 0)


# -- the new pipeline ---------------------------------------------------------------------------
def new_datamodule(root: str | None, batch: int, synthetic: int, device: torch.device) -> CifarDataModule:
    dm = CifarDataModule(root=root or "unused", download=False, batch_size=batch)
    if root:
        dm.setup()
    else:  # CIFAR-sized random uint8 images
        gen = torch.Generator().manual_seed(0)
        dm.train_set = ResidentImages(torch.randint(0, 256, (synthetic, 3, 32, 32), dtype=torch.uint8, generator=gen),
                                      torch.randint(0, 10, (synthetic,), generator=gen))
        dm.test_set = dm.val_set = dm.train_set
        from flgc_lightning.data.augment import BatchTransform
        dm.transform = BatchTransform(CIFAR_MEAN, CIFAR_STD, dm.crop_padding)
    dm.train_set.to(device)
    return dm


def new_batches(dm: CifarDataModule, device: torch.device):
    """Training batches as the Trainer gets them: planned, gathered and augmented on ``device``."""
    for batch in dm.train_dataloader():
        yield dm.on_after_batch_transfer(batch, 0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(batches, limit_images: int, device: torch.device) -> float:
    """Consume batches (warm-up: the first one) until ``limit_images`` images; images/s."""
    iterator = iter(batches)
    next(iterator)
    sync(device)
    seen, start = 0, time.perf_counter()
    for images, _ in iterator:
        seen += len(images)
        if seen >= limit_images:
            break
    sync(device)
    return seen / (time.perf_counter() - start)


def step_fn(net: torch.nn.Module, device: torch.device):
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=4e-5)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    def step(images, labels):
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = F.cross_entropy(net(images), labels)
        loss.backward()
        opt.step()
    return step


def time_training(batches_fn, step, steps: int, device: torch.device) -> tuple[float, float]:
    """Median seconds per step with data, and per step on one fixed batch (no data work)."""
    batches = batches_fn()
    first = next(batches)
    step(*first)
    with_data = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        images, labels = next(batches)
        step(images.to(device, non_blocking=True), labels.to(device, non_blocking=True))
        sync(device)
        with_data.append(time.perf_counter() - start)
    alone = []
    fixed = (first[0].to(device), first[1].to(device))
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        step(*fixed)
        sync(device)
        alone.append(time.perf_counter() - start)
    return statistics.median(with_data), statistics.median(alone)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "cifar10-subset"),
                        help="CIFAR-10 folder (official python layout); 'synthetic' for random CIFAR-sized images")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the training steps")
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per model and pipeline (median)")
    parser.add_argument("--old-workers", type=int, default=2, help="worker processes of the old pipeline's DataLoader")
    parser.add_argument("--images", type=int, default=50_000, help="synthetic images (CIFAR-10 size) for the GPU epoch")
    args = parser.parse_args(argv)
    root = None if args.data == "synthetic" else args.data
    cpu = torch.device("cpu")

    dm = new_datamodule(root, args.batch, args.images, cpu)
    images = dm.train_set.images.permute(0, 2, 3, 1).numpy()  # HWC uint8 for PIL
    labels = dm.train_set.labels.numpy()
    n = len(labels)
    print(f"torch {torch.__version__}; data: {root or 'synthetic'} ({n} training images); batch {args.batch}\n")

    print("1. Data pipeline alone (one thread), images/s")
    torch.set_num_threads(1)
    rows = {
        "old: PIL per image, seeded, num_workers=0": images_per_second(old_loader(images, labels, args.batch, 0), min(n, 2048), cpu),
        f"old: PIL per image, seeded, num_workers={args.old_workers}": images_per_second(
            old_loader(images, labels, args.batch, args.old_workers), min(n, 4096), cpu),
        "new: resident uint8, batch augmentation (CPU)": images_per_second(new_batches(dm, cpu), n, cpu),
    }
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        rows["new: resident uint8, batch augmentation (CUDA)"] = images_per_second(
            new_batches(new_datamodule(root, args.batch, args.images, gpu), gpu), n, gpu)
    width = max(map(len, rows))
    for name, rate in rows.items():
        print(f"  {name:{width}s} {rate:12,.0f}")
    new_rate = rows["new: resident uint8, batch augmentation (CPU)"]
    old_rate = rows["old: PIL per image, seeded, num_workers=0"]
    data_ok = new_rate >= 50_000
    print(f"  new / old (both one process): {new_rate / old_rate:.1f}x; target >= 50,000 images/s: "
          f"{'PASS' if data_ok else 'FAIL'}\n")

    torch.set_num_threads(args.threads)
    print(f"2. Training steps on the CPU ({args.threads} threads), batch {args.batch}: median of {args.steps} steps")
    print(f"  {'model':14s} {'pipeline':34s} {'ms/step':>9s} {'images/s':>9s} {'data share':>11s}")
    share_ok = True
    for name, kwargs in MODELS.items():
        torch.manual_seed(0)
        step = step_fn(MobileNetV2(**kwargs), cpu)
        for pipeline, batches in ((f"old, num_workers={args.old_workers}", lambda: iter(old_loader(images, labels, args.batch, args.old_workers))),
                                  ("new, resident", lambda: new_batches(dm, cpu))):
            with_data, alone = time_training(batches, step, args.steps, cpu)
            share = max(0.0, with_data - alone) / with_data
            print(f"  {name:14s} {pipeline:34s} {1000 * with_data:9.0f} {args.batch / with_data:9.0f} {100 * share:10.1f} %")
            if name == "FLGC G=8" and pipeline.startswith("new"):
                share_ok = share < 0.02
    print(f"  data share of the FLGC step with the new pipeline < 2 %: {'PASS' if share_ok else 'FAIL'}")
    print("  (data share = (step with its data - step on a fixed batch) / step with its data)\n")

    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        torch.backends.cudnn.benchmark = True
        gdm = new_datamodule(None, args.batch, args.images, gpu)
        print(f"3. CUDA ({torch.cuda.get_device_name(gpu)}), channels_last, bf16-mixed, batch {args.batch}")
        for name, kwargs in MODELS.items():
            torch.manual_seed(0)
            net = MobileNetV2(**kwargs).to(gpu, memory_format=torch.channels_last)
            step = step_fn(net, gpu)
            for images_, labels_ in new_batches(gdm, gpu):  # warm-up epoch part (cudnn autotuning)
                step(images_, labels_)
                break
            sync(gpu)
            start = time.perf_counter()
            count = 0
            for images_, labels_ in new_batches(gdm, gpu):
                step(images_, labels_)
                count += len(labels_)
            sync(gpu)
            epoch = time.perf_counter() - start
            print(f"  {name:14s} epoch of {count:,} images: {epoch:6.2f} s ({count / epoch:,.0f} images/s); "
                  f"400 epochs: {400 * epoch / 60:.1f} min (+ evaluation)")
    return 0 if data_ok and share_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
