"""The sampler's computed permutation for large data sets: a bijection, held in no table; the split
of the global batch between sites of different sizes."""

import math

import pytest
import torch

from shoal.data import sampler as sampler_module
from shoal.data.sampler import FeistelPermutation, ShardedSampler, place_in_sites


def test_feistel_permutation_is_a_seeded_bijection_of_any_size():
    for n in (1, 2, 5, 1000, 4097):
        perm = FeistelPermutation(n, key=42)(torch.arange(n))
        assert sorted(perm.tolist()) == list(range(n))
    a, b = FeistelPermutation(1000, 1)(torch.arange(1000)), FeistelPermutation(1000, 2)(torch.arange(1000))
    assert not torch.equal(a, b) and not torch.equal(a, torch.arange(1000))


def test_large_data_sets_use_the_computed_order_with_the_same_guarantees(monkeypatch):
    monkeypatch.setattr(sampler_module, "EXPLICIT_LIMIT", 100)
    n, batch = 1000, 40
    one = ShardedSampler(n, batch, seed=3)
    epoch0 = torch.cat([one.next_batch(0, 1) for _ in range(n // batch)])
    assert sorted(epoch0.tolist()) == list(range(n))  # every sample once per epoch
    assert isinstance(one.permutation(), FeistelPermutation)
    two = [ShardedSampler(n, batch, seed=3) for _ in range(2)]
    joined = torch.cat([torch.cat([two[r].next_batch(r, 2) for r in range(2)]) for _ in range(n // batch)])
    assert torch.equal(joined, epoch0)  # same order on any number of ranks
    resumed = ShardedSampler(n, batch, seed=3)
    resumed.load_state_dict({"epoch": 0, "position": 400})
    assert torch.equal(resumed.next_batch(0, 1), epoch0[400:440])
    assert not torch.equal(one.next_batch(0, 1), epoch0[:batch])  # the next epoch is another order


@pytest.mark.parametrize("sizes", [[2, 1], [1, 2], [1, 3], [3, 1, 2], [1, 2, 4]])
def test_sites_of_any_sizes_read_each_sample_of_every_batch_once(sizes):
    """Each site computes its workers' places knowing only its own size and the number of sites:
    together every worker of every site reads the global batch once, in order, step after step."""
    sites = len(sizes)
    batch = 2 * sites * math.lcm(*sizes)  # a multiple of sites x every site's size
    workers = [(place_in_sites(site, sites, rank, size), ShardedSampler(100, batch, seed=5))
               for site, size in enumerate(sizes) for rank in range(size)]
    one = ShardedSampler(100, batch, seed=5)
    for _ in range(30):  # several epochs of 100 samples
        read = torch.cat([sampler.next_batch(*place) for place, sampler in workers])
        assert torch.equal(read, one.next_batch(0, 1))
    shares = [sum(len(ShardedSampler(100, batch, 5).next_batch(*place_in_sites(site, sites, r, size)))
                  for r in range(size)) for site, size in enumerate(sizes)]
    assert shares == [batch // sites] * sites  # equal shares per site, whatever its worker count
    with pytest.raises(ValueError):
        place_in_sites(2, 2, 0, 1)


@pytest.mark.parametrize("num_samples", [23, 2_000_000])  # the explicit permutation and the computed one
def test_moving_back_or_on_reads_the_batches_the_run_read_there(num_samples):
    """`move` puts the sampler where that many batches more or fewer would have left it, across epochs (a
    site that takes another's state trains its later steps again on their own samples: docs/sites.md)."""
    batches = [(s.epoch, s.next_batch(0, 1).tolist()) for s in [ShardedSampler(num_samples, 5, 3)] for _ in range(13)]
    ran = ShardedSampler(num_samples, 5, 3)
    for _ in range(11):
        ran.next_batch(0, 1)
    for target in (2, 0, 9, 4, 11):  # back over epoch ends (4 batches of 5 in 23), to the start, on again
        ran.move(target - (ran.epoch * (num_samples // 5) + ran.position // 5))
        assert (ran.epoch, ran.next_batch(0, 1).tolist()) == batches[target], target
        ran.move(-1)
    with pytest.raises(ValueError, match="cannot move"):
        ShardedSampler(num_samples, 5, 3).move(-1)
