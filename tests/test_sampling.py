"""The seeded, resumable sampler and per-sample augmentation seeding."""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from flgc_lightning.data.sampling import EpochSampler, SeededAugmentation


def test_order_depends_only_on_seed_and_epoch():
    a, b = EpochSampler(50, seed=3), EpochSampler(50, seed=3)
    torch.manual_seed(0)
    first = list(a)
    torch.manual_seed(123)  # the global RNG does not matter
    assert list(b) == first
    assert sorted(i for _, i in first) == list(range(50)) and {e for e, _ in first} == {0}
    a.set_epoch(1)
    second = list(a)
    assert [i for _, i in second] != [i for _, i in first] and {e for e, _ in second} == {1}
    assert [i for _, i in EpochSampler(50, seed=4)] != [i for _, i in first]
    assert [i for _, i in EpochSampler(5, shuffle=False)] == [0, 1, 2, 3, 4]


def test_skip_applies_to_one_epoch_only():
    sampler = EpochSampler(20, seed=1)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.skip_in_epoch(2, 8)
    assert list(sampler) == full[8:]
    assert list(sampler) == full  # next pass over the same epoch is whole again


def test_ranks_split_the_epoch(monkeypatch):
    seen = []
    for rank in (0, 1, 2):
        sampler = EpochSampler(10, seed=0)
        monkeypatch.setattr(EpochSampler, "_world", staticmethod(lambda r=rank: (3, r)))
        assert len(sampler) == 4
        seen += [i for _, i in sampler]
    assert len(seen) == 12 and set(seen) == set(range(10))  # padded like DistributedSampler


class RandomItems(Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        return index, torch.rand(3)  # stands in for a random augmentation


def test_seeded_augmentation_is_reproducible_and_leaves_global_rng_alone():
    data = SeededAugmentation(RandomItems(), seed=7)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    first = data[(1, 2)]
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(99)
    assert torch.equal(data[(1, 2)][1], first[1])
    assert not torch.equal(data[(2, 2)][1], first[1])  # another epoch, another augmentation
    assert not torch.equal(data[(1, 3)][1], first[1])
    assert data[2][0] == 2  # plain indices pass through
