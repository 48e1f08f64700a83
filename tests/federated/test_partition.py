"""Partitions deal every sample once, and skew labels the way each method promises."""

import numpy as np
import pytest

from shoal.config import ConfigError
from shoal.federated.partition import partition

LABELS = np.repeat(np.arange(10), 100)


@pytest.mark.parametrize("method", ["iid", "dirichlet", "shards"])
def test_every_sample_goes_to_exactly_one_client(method):
    parts = partition(LABELS, 20, method, alpha=0.3, seed=1)
    assert len(parts) == 20
    everything = np.concatenate(parts)
    assert sorted(everything.tolist()) == list(range(len(LABELS)))


def classes_per_client(parts):
    return np.mean([len(np.unique(LABELS[p])) for p in parts if len(p)])


def test_skew_orders_iid_dirichlet_shards():
    iid = classes_per_client(partition(LABELS, 20, "iid", seed=0))
    skewed = classes_per_client(partition(LABELS, 20, "dirichlet", alpha=0.1, seed=0))
    shards = partition(LABELS, 20, "shards", shards_per_client=2, seed=0)
    assert iid == 10
    assert skewed < 6
    assert classes_per_client(shards) <= 2 and all(len(p) == 50 for p in shards)


def test_many_more_clients_than_samples_is_allowed():
    parts = partition(LABELS[:50], 1000, "iid")
    assert sum(len(p) for p in parts) == 50 and len(parts) == 1000


def test_unknown_method_is_refused():
    with pytest.raises(ConfigError, match="unknown"):
        partition(LABELS, 2, "bogus")
