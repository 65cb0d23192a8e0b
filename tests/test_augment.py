"""Batch augmentation planned per epoch: the reference transforms' distribution, exact pixels, exact resume."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from scipy import stats
from torchvision import transforms

from flgc_lightning.data import BatchTransform, EpochPlan, ImageBatch, ResidentImages
from flgc_lightning.data.augment import crop_and_flip, normalize
from flgc_lightning.data.batches import EvalBatches, PlanSampler, TrainBatches
from flgc_lightning.data.cifar import CIFAR_MEAN, CIFAR_STD


def reference_pixels(image: torch.Tensor, dy: int, dx: int, flip: bool, pad: int = 4) -> torch.Tensor:
    """torchvision's RandomCrop(padding) + HorizontalFlip + ToTensor + Normalize for fixed choices, on one uint8 image."""
    pil = TF.to_pil_image(image)
    padded = TF.pad(pil, pad)  # zero fill, as RandomCrop(padding=4) does
    size = image.shape[1]
    out = TF.crop(padded, dy, dx, size, size)
    if flip:
        out = TF.hflip(out)
    return TF.normalize(TF.to_tensor(out), CIFAR_MEAN, CIFAR_STD)


def test_crops_flips_and_normalisation_equal_the_reference_transforms_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=gen)
    crops = torch.tensor([[dy, dx, f] for dy, dx, f in zip(
        torch.randint(0, 9, (12,), generator=gen), torch.randint(0, 9, (12,), generator=gen),
        torch.randint(0, 2, (12,), generator=gen))])
    crops[0] = torch.tensor([0, 0, 0])
    crops[1] = torch.tensor([8, 8, 1])  # both corners of the padded image
    out, labels = BatchTransform(CIFAR_MEAN, CIFAR_STD, pad=4)(ImageBatch(images, torch.arange(12), crops))
    for i in range(12):
        dy, dx, flip = crops[i].tolist()
        assert torch.equal(out[i], reference_pixels(images[i], dy, dx, bool(flip))), i
    assert labels.tolist() == list(range(12))
    # evaluation batches: ToTensor + Normalize only
    evaluated, _ = BatchTransform(CIFAR_MEAN, CIFAR_STD, pad=4)(ImageBatch(images, torch.arange(12)))
    assert torch.equal(evaluated[3], TF.normalize(TF.to_tensor(TF.to_pil_image(images[3])), CIFAR_MEAN, CIFAR_STD))


def test_offsets_and_flips_have_the_reference_distribution():
    """RandomCrop(32, padding=4) picks each offset uniformly in 0..8 per axis; HorizontalFlip has p = 0.5."""
    plan = EpochPlan.draw(seed=3, epoch=5, length=30_000, pad=4, hflip=True)
    for column, support in ((0, 9), (1, 9), (2, 2)):
        counts = np.bincount(plan.crops[:, column].numpy(), minlength=support)
        assert len(counts) == support
        assert stats.chisquare(counts).pvalue > 1e-3, (column, counts)
    # independence of the two offsets (the reference draws them independently)
    table = np.zeros((9, 9))
    np.add.at(table, (plan.crops[:, 0].numpy(), plan.crops[:, 1].numpy()), 1)
    assert stats.chi2_contingency(table).pvalue > 1e-3
    # torchvision's own transform, observed through a marker pixel, has the same support
    marker = torch.zeros(1, 32, 32, dtype=torch.uint8)
    marker[0, 0, 0] = 255
    seen = set()
    crop = transforms.RandomCrop(32, padding=4)
    torch.manual_seed(0)
    for _ in range(2000):
        out = TF.pil_to_tensor(crop(TF.to_pil_image(marker)))
        where = torch.nonzero(out[0] == 255)
        if len(where):
            seen.add(tuple(where[0].tolist()))
    ours = {(4 - dy, 4 - dx) for dy, dx in plan.crops[:, :2].tolist() if 4 - dy >= 0 and 4 - dx >= 0}
    assert ours == seen  # the marker lands on the same positions: offsets 0..4 keep it in the window
    assert EpochPlan.draw(seed=3, epoch=5, length=100, pad=4, hflip=False).crops[:, 2].eq(0).all()


def test_plan_depends_only_on_seed_and_epoch_and_covers_each_image_once():
    a = EpochPlan.draw(seed=1, epoch=2, length=1000, pad=4, hflip=True)
    torch.manual_seed(123)  # the global RNG plays no part
    b = EpochPlan.draw(seed=1, epoch=2, length=1000, pad=4, hflip=True)
    assert torch.equal(a.order, b.order) and torch.equal(a.crops, b.crops)
    assert sorted(a.order.tolist()) == list(range(1000))
    for other in (EpochPlan.draw(1, 3, 1000, 4, True), EpochPlan.draw(2, 2, 1000, 4, True)):
        assert not torch.equal(a.order, other.order) and not torch.equal(a.crops, other.crops)


def test_ranks_take_disjoint_shares_padded_like_distributed_sampler():
    plan = EpochPlan.draw(seed=0, epoch=0, length=10, pad=4, hflip=True)
    shards = [plan.shard(rank, 3) for rank in range(3)]
    assert [len(s.order) for s in shards] == [4, 4, 4]
    seen = [i for s in shards for i in s.order.tolist()]
    assert set(seen) == set(range(10)) and len(seen) == 12  # two wrapped duplicates, as DistributedSampler pads
    assert set(shards[0].order[:3].tolist()).isdisjoint(shards[1].order[:3].tolist())
    merged = torch.stack([s.crops for s in shards], 1).reshape(-1, 3)[:10]
    assert torch.equal(merged, plan.crops)  # each position keeps its own crop whatever the world size


def resident(n=50, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return ResidentImages(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen), torch.arange(n))


def test_each_image_once_per_epoch_same_batches_for_resident_and_loader_paths():
    source = resident(50)
    runs = []
    for options in (None, {"num_workers": 0}, {"num_workers": 2}):
        sampler = PlanSampler(50, seed=4, pad=4, hflip=True)
        batches = TrainBatches(source, 16, sampler, options)
        epochs = []
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            epochs.append(list(batches))
        runs.append(epochs)
    for epochs in runs:
        for epoch in epochs:
            assert len(epoch) == 4
            labels = torch.cat([b.labels for b in epoch])
            assert sorted(labels.tolist()) == list(range(50))
    for other in runs[1:]:
        for e_a, e_b in zip(runs[0], other):
            for a, b in zip(e_a, e_b):
                assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and torch.equal(a.crops, b.crops)
    assert not torch.equal(runs[0][0][0].labels, runs[0][1][0].labels)  # another epoch, another order


def test_plan_is_drawn_when_the_first_batch_is_requested_and_the_skip_applies_to_its_epoch_only():
    """Lightning creates a resumed run's iterator before it sets the epoch; the plan must follow the epoch set
    later, and a skip recorded for a finished epoch must not cut the next one (the bug of issue 11)."""
    sampler = PlanSampler(50, seed=4, pad=4, hflip=True)
    batches = TrainBatches(resident(50), 10, sampler, {"num_workers": 2})
    sampler.skip_in_epoch(0, 50)  # the checkpoint: epoch 0 done
    iterator = iter(batches)  # created while the epoch counter still says 0
    sampler.set_epoch(1)
    first = next(iterator)
    fresh = PlanSampler(50, seed=4, pad=4, hflip=True)
    fresh.set_epoch(1)
    expected = next(iter(TrainBatches(resident(50), 10, fresh)))
    assert torch.equal(first.labels, expected.labels) and torch.equal(first.crops, expected.crops)
    # mid-epoch: the skip drops exactly the trained batches of that epoch
    sampler.set_epoch(3)
    whole = list(batches)
    sampler.skip_in_epoch(3, 20)
    assert [b.labels.tolist() for b in batches] == [b.labels.tolist() for b in whole[2:]]
    assert len(list(batches)) == len(whole)  # the next pass is whole again


def test_evaluation_batches_in_order_without_crops():
    source = resident(23)
    for options in (None, {"num_workers": 0}):
        batches = list(EvalBatches(source, 10, options))
        assert [len(b.labels) for b in batches] == [10, 10, 3]
        assert torch.cat([b.labels for b in batches]).tolist() == list(range(23))
        assert all(b.crops is None for b in batches)


def test_normalize_matches_to_tensor_and_normalize():
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    expected = torch.stack([TF.normalize(TF.to_tensor(TF.to_pil_image(i)), CIFAR_MEAN, CIFAR_STD) for i in images])
    assert torch.equal(normalize(images, torch.tensor(CIFAR_MEAN), torch.tensor(CIFAR_STD)), expected)


def by_hand_with_numpy(images: np.ndarray, order: np.ndarray, crops: np.ndarray, pad: int = 4) -> np.ndarray:
    """The reference augmentation written out with numpy, one image at a time: take the planned image, zero-pad,
    crop at the planned offsets, mirror if planned, then x / 255, - mean, / std in float32."""
    mean = np.array(CIFAR_MEAN, dtype=np.float32)[:, None, None]
    std = np.array(CIFAR_STD, dtype=np.float32)[:, None, None]
    size = images.shape[-1]
    out = []
    for index, (dy, dx, flip) in zip(order, crops):
        padded = np.pad(images[index], ((0, 0), (pad, pad), (pad, pad)))
        window = padded[:, dy:dy + size, dx:dx + size]
        if flip:
            window = window[:, :, ::-1]
        out.append((window.astype(np.float32) / np.float32(255) - mean) / std)
    return np.stack(out)


def test_the_cpu_batch_path_equals_the_augmentation_written_by_hand():
    """The path a CPU run takes (plan, gather from resident images, crop, flip, normalise), against numpy; the CUDA
    device is checked against the CPU below where there is one."""
    source = resident(40, seed=7)
    plan = EpochPlan.draw(seed=9, epoch=1, length=40, pad=4, hflip=True)
    assert plan.crops[:, 2].any() and not plan.crops[:, 2].all()  # both flipped and plain images in the batch
    transform = BatchTransform(CIFAR_MEAN, CIFAR_STD, pad=4)
    batch, labels = transform(ImageBatch(*source.take(plan.order[:16]), plan.crops[:16]))
    expected = by_hand_with_numpy(source.images.numpy(), plan.order[:16].numpy(), plan.crops[:16].numpy())
    assert np.array_equal(batch.numpy(), expected)
    assert labels.tolist() == plan.order[:16].tolist()  # resident(): label i is image i


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_same_batch_on_cpu_and_cuda():
    source = resident(40)
    plan = EpochPlan.draw(seed=9, epoch=1, length=40, pad=4, hflip=True)
    transform = BatchTransform(CIFAR_MEAN, CIFAR_STD, pad=4)
    cpu, _ = transform(ImageBatch(*source.take(plan.order[:16]), plan.crops[:16]))
    on_gpu = ResidentImages(source.images.clone(), source.labels.clone()).to("cuda")
    gpu, _ = transform(ImageBatch(*on_gpu.take(plan.order[:16]), plan.crops[:16].cuda()))
    assert torch.equal(cpu, gpu.cpu())


def test_crop_and_flip_of_a_single_channel_image():
    image = torch.arange(64, dtype=torch.uint8).view(1, 1, 8, 8)
    out = crop_and_flip(image, torch.tensor([[1, 2, 1]]), pad=1)
    padded = torch.nn.functional.pad(image, (1, 1, 1, 1))
    assert torch.equal(out[0, 0], padded[0, 0, 1:9, 2:10].flip(-1))
