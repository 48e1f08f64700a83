"""data.factory: a user's map-style torch Dataset behind the get(ids) contract."""

import os
import sys
import textwrap

import pytest
import torch

from shoal.config import ConfigError, DataConfig
from shoal.data import ShardedSampler, build_dataset
from shoal.data.factory import BadRecord, from_torch_dataset
from tests.conftest import TINY, shoal, train_losses

USER_MODULE = textwrap.dedent('''
    import torch
    from torch.utils.data import Dataset

    class Squares(Dataset):
        """x in R^4, label = which quadrant-like rule holds; 3 classes."""
        num_classes = 3
        def __init__(self, n=512, broken=()):
            g = torch.Generator().manual_seed(0)
            self.x = torch.randn(n, 4, generator=g)
            self.y = (self.x[:, 0] > 0).long() + (self.x[:, 1] > 0.5).long()
            self.broken = set(broken)
        def __len__(self):
            return len(self.x)
        def __getitem__(self, i):
            if i in self.broken:
                raise OSError(f"record {i} is corrupt")
            return self.x[i], self.y[i]

    class Dicts(Squares):
        def __getitem__(self, i):
            return {"features": self.x[i], "label": self.y[i]}

    def build():
        return Squares()

    def build_pair(cfg):
        return Squares(400), Squares(64)

    def build_dicts():
        return Dicts()

    def twice(items):
        x = torch.stack([x for x, _ in items])
        return 2 * x, torch.stack([y for _, y in items])
''')


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "userdata.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("userdata", None)
    import userdata
    return userdata


def test_factory_dataset_reads_by_id_in_the_samplers_order(user_module):
    train, val, spec = build_dataset(DataConfig(factory="userdata:build", val_fraction=0.25))
    assert (len(train), len(val)) == (384, 128)
    assert (spec.kind, spec.in_features, spec.num_classes) == ("classes", 4, 3)
    ids = ShardedSampler(len(train), 16, seed=3).next_batch(0, 1)
    x, y = train.get(ids)
    ds = user_module.Squares()
    assert torch.equal(x, ds.x[ids]) and torch.equal(y, ds.y[ids])
    xv, _ = val.get(torch.tensor([0, 5]))
    assert torch.equal(xv, ds.x[[384, 389]])  # the held-out split is the tail


def test_factory_pair_collate_and_dict_items(user_module):
    train, val, spec = build_dataset(DataConfig(factory="userdata:build_pair", collate="userdata:twice"))
    assert (len(train), len(val)) == (400, 64)
    x, _ = train.get(torch.tensor([1, 2]))
    assert torch.equal(x, 2 * user_module.Squares(400).x[[1, 2]])
    train, _, spec = build_dataset(DataConfig(factory="userdata:build_dicts"))
    inputs, targets = train.get(torch.tensor([3, 4]))
    assert set(inputs) == {"features"} and torch.equal(targets, user_module.Squares().y[[3, 4]])
    assert spec.num_classes == 3


def test_bad_records_error_names_the_sample_or_are_skipped_and_counted(user_module):
    ds = user_module.Squares(64, broken={5})
    train, _, _ = from_torch_dataset(ds, val_fraction=0.0)
    with pytest.raises(BadRecord, match="sample 5 cannot be read: OSError: record 5 is corrupt"):
        train.get(torch.tensor([4, 5, 6]))
    train, _, _ = from_torch_dataset(ds, val_fraction=0.0, on_bad_record="skip")
    x, y = train.get(torch.tensor([4, 5, 6]))
    assert len(x) == 2 and train.bad_records == 1


def test_factory_errors_are_one_line(user_module):
    with pytest.raises(ConfigError, match="data.factory = 'userdata:nope' cannot be imported"):
        build_dataset(DataConfig(factory="userdata:nope"))


@pytest.mark.slow
def test_shoal_run_trains_a_factory_dataset(tmp_path, user_module):
    out = shoal("run", *TINY, "train.steps=4", "data.factory=userdata:build", "model.name=mlp", cwd=tmp_path,
                env={"PYTHONPATH": f"{tmp_path}:{os.environ.get('PYTHONPATH', '')}"})
    assert out.returncode == 0, out.stderr
    assert list(train_losses(tmp_path / "runs" / "quickstart")) == [1, 2, 3, 4]
