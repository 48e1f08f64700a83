import numpy as np
import pytest
import torch

from shoal import config
from shoal.config import ConfigError
from shoal.data import ShardedSampler, build_dataset
from shoal.data.datasets import stdlib_split


def test_ranks_see_disjoint_shards_and_the_same_global_order():
    single = ShardedSampler(100, 8, seed=3)
    ranks = [ShardedSampler(100, 8, seed=3) for _ in range(4)]
    for _ in range(30):  # crosses epoch boundaries
        whole = single.next_batch(0, 1)
        parts = [s.next_batch(r, 4) for r, s in enumerate(ranks)]
        assert torch.equal(torch.cat(parts), whole)
    assert single.epoch == ranks[0].epoch == 2


def test_an_epoch_visits_each_sample_once():
    sampler = ShardedSampler(64, 8, seed=0)
    seen = torch.cat([sampler.next_batch(0, 1) for _ in range(8)])
    assert sorted(seen.tolist()) == list(range(64))
    assert not torch.equal(seen, torch.arange(64))  # shuffled


def test_sampler_position_resumes_exactly():
    a = ShardedSampler(50, 4, seed=1)
    for _ in range(17):
        a.next_batch(1, 2)
    b = ShardedSampler(50, 4, seed=1)
    b.load_state_dict(a.state_dict())
    for _ in range(20):
        assert torch.equal(a.next_batch(1, 2), b.next_batch(1, 2))


def test_stdlib_corpus_is_cached_and_shifted_by_one(tmp_path):
    cfg = config.load(None, [f"data.cache_dir={tmp_path}", "data.max_bytes=20000", "data.seq_len=16"])
    train, val, spec = build_dataset(cfg.data)
    assert spec.kind == "tokens" and spec.vocab_size == 256 and spec.seq_len == 16
    cached = sorted(p.name.rsplit("-", 1)[1] for p in tmp_path.glob("stdlib-*.npy"))
    assert cached == ["train.npy", "val.npy"]  # one tokenised file per split
    build_dataset(cfg.data)
    assert len(list(tmp_path.glob("stdlib-*.npy"))) == 2  # the second build reads the cache
    x, y = train.get(torch.tensor([0, 5]))
    assert x.shape == (2, 16) and torch.equal(x[:, 1:], y[:, :-1])
    train_bytes, val_bytes = stdlib_split(20000, tmp_path, cfg.data.val_fraction)
    assert len(train) == (len(train_bytes) - 1) // 16 and len(val) == (len(val_bytes) - 1) // 16 > 0


def test_text_files_and_npy_arrays(tmp_path):
    (tmp_path / "a.txt").write_text("hello world " * 50)
    cfg = config.load(None, ["data.source=text", f"data.path={tmp_path}", "data.seq_len=8"])
    train, _, _ = build_dataset(cfg.data)
    x, _ = train.get(torch.tensor([0]))
    assert bytes(x[0].tolist()) == b"hello wo"
    np.save(tmp_path / "x.npy", np.random.rand(40, 3).astype(np.float32))
    np.save(tmp_path / "y.npy", np.arange(40) % 5)
    cfg = config.load(None, ["data.source=npy", f"data.path={tmp_path}", "model.name=mlp"])
    train, val, spec = build_dataset(cfg.data)
    assert (spec.kind, spec.in_features, spec.num_classes) == ("classes", 3, 5)
    assert len(train) + len(val) == 40


def test_bad_npy_names_the_file(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((4, 2, 2)))
    np.save(tmp_path / "y.npy", np.zeros(4))
    cfg = config.load(None, ["data.source=npy", f"data.path={tmp_path}"])
    with pytest.raises(ConfigError, match="x.npy must be 2-D"):
        build_dataset(cfg.data)
    np.save(tmp_path / "x.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(ConfigError, match="not a plain .npy"):
        build_dataset(cfg.data)


def test_global_batch_larger_than_data_is_refused():
    with pytest.raises(ValueError, match="train.batch_size = 20 exceeds"):
        ShardedSampler(10, 20, seed=0)
