"""data.source = 'images': deterministic augmentation, loader workers that change nothing, bad images."""

import importlib.util
import threading
from pathlib import Path

import pytest
import torch

from shoal.config import ConfigError, DataConfig, ModelConfig
from shoal.data import ShardedSampler, build_dataset
from shoal.data.factory import BadRecord
from shoal.data.loader import Loader
from shoal.models import build_model
from tests.conftest import TINY, shoal, train_losses

ROOT = Path(__file__).resolve().parents[2]


def make_data(out, per_class):
    spec = importlib.util.spec_from_file_location("make_data", ROOT / "examples" / "imaging" / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make(out, per_class, size=20)


def test_batches_are_deterministic_per_sample_and_epoch(tmp_path):
    make_data(tmp_path / "shapes", 6)
    train, val, spec = build_dataset(DataConfig(source="images", path=str(tmp_path / "shapes"), image_size=16,
                                                val_fraction=0.25), seed=3)
    assert (spec.num_classes, spec.input_shape, len(train), len(val)) == (4, (3, 16, 16), 18, 6)
    ids = torch.tensor([4, 0, 17])
    x, y = train.dataset.get(ids, epoch=1)
    assert x.shape == (3, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.long
    assert torch.equal(x, train.dataset.get(ids, epoch=1)[0])
    assert not torch.equal(x, train.dataset.get(ids, epoch=2)[0])  # a new crop/flip each epoch
    xv, _ = val.get(torch.tensor([0, 1]))
    assert torch.equal(xv, val.get(torch.tensor([0, 1]))[0])
    model = build_model(ModelConfig(name="cnn"), spec)
    assert model(x).shape == (3, 4)


@pytest.mark.slow
def test_two_loader_workers_give_the_same_batches_as_none_even_when_membership_changes(tmp_path):
    make_data(tmp_path / "shapes", 8)
    cfg = DataConfig(source="images", path=str(tmp_path / "shapes"), image_size=16, val_fraction=0.0)
    plain = build_dataset(cfg, seed=1)[0]
    workers = build_dataset(DataConfig(**{**cfg.__dict__, "loader_workers": 2, "prefetch": 2}), seed=1)[0]
    assert isinstance(workers, Loader) and workers.workers == 2
    placement = [(0, 1)]
    samplers = [ShardedSampler(len(plain), 8, seed=5) for _ in range(2)]
    plain.follow(samplers[0], lambda: placement[0])
    workers.follow(samplers[1], lambda: placement[0])
    for step in range(12):  # three epochs of 4 steps
        if step == 6:
            placement[0] = (1, 2)  # a fault-tolerant regroup: this rank now reads the second half
        ids = [s.next_batch(*placement[0]) for s in samplers]
        assert torch.equal(ids[0], ids[1])
        a, b = plain.get(ids[0]), workers.get(ids[1])
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), f"step {step}"
    assert workers.planned >= 8 and workers.unplanned == 2  # read ahead, except at the start and the regroup
    workers.close()  # the thread receiving batches ahead of the step is gone
    assert not [t for t in threading.enumerate() if t.name == "shoal-loader-receive"]


@pytest.mark.slow
def test_a_csv_listing_and_bad_images(tmp_path):
    make_data(tmp_path / "shapes", 3)
    rows = [f"{p.relative_to(tmp_path)},{p.parent.name}" for p in sorted((tmp_path / "shapes").rglob("*.png"))]
    (tmp_path / "shapes" / "ring" / "00001.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "list.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    cfg = DataConfig(source="images", path=str(tmp_path / "list.csv"), image_size=16, val_fraction=0.0)
    train, _, spec = build_dataset(cfg)
    assert spec.num_classes == 4 and len(train) == 12
    bad = next(i for i, (path, _) in enumerate(train.dataset.items) if path.endswith("ring/00001.png"))
    with pytest.raises(BadRecord, match=r"shapes/ring/00001.png: not a readable image"):
        train.dataset.get(torch.tensor([bad, 0]))
    skipping = build_dataset(DataConfig(**{**cfg.__dict__, "on_bad_record": "skip"}))[0].dataset
    x, y = skipping.get(torch.tensor([bad, 0, 1]))
    assert len(x) == len(y) == 2 and skipping.bad_records == 1
    loader = Loader(train.dataset, workers=1)  # met in a loader worker: the same one-line error
    sampler = ShardedSampler(len(train), 2, seed=0, shuffle=False)
    loader.follow(sampler, lambda: (0, 1))
    with pytest.raises(BadRecord) as caught:
        for _ in range(len(train) // 2):
            loader.get(sampler.next_batch(0, 1))
    assert str(caught.value).startswith(f"{tmp_path}/shapes/ring/00001.png: not a readable image")
    assert "\n" not in str(caught.value) and loader.planned > 0
    (tmp_path / "gone.csv").write_text("path,label\nnowhere.png,a\nother.png,b\n")
    with pytest.raises(ConfigError, match="gone.csv: lists .*nowhere.png, which does not exist"):
        build_dataset(DataConfig(source="images", path=str(tmp_path / "gone.csv")))


@pytest.mark.slow
def test_shoal_run_trains_the_imaging_example_with_loader_workers(tmp_path):
    make_data(tmp_path / "data" / "shapes", 16)
    out = shoal("run", str(ROOT / "examples" / "imaging" / "config.toml"), *TINY, "train.steps=4",
                "data.image_size=16", "checkpoint.every=0", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert list(train_losses(tmp_path / "runs" / "imaging")) == [1, 2, 3, 4]


def test_small_tensors_leave_a_loader_worker_by_value_and_come_back_equal():
    import pickle

    from shoal.data.loader import _pack, _unpack, _Value
    batch = (torch.arange(4), {"x": torch.ones(2, dtype=torch.bfloat16), "y": torch.zeros(3)}, [torch.ones(300_000)])
    packed = _pack(batch)
    assert isinstance(packed[0], _Value) and isinstance(packed[1]["y"], _Value)
    assert isinstance(packed[1]["x"], torch.Tensor)  # numpy has no bfloat16: it goes as a tensor
    assert isinstance(packed[2][0], torch.Tensor)  # 1.2 MB: through shared memory, as torch does
    back = _unpack(pickle.loads(pickle.dumps(packed)))
    assert torch.equal(back[0], batch[0]) and torch.equal(back[1]["x"], batch[1]["x"])
    assert torch.equal(back[1]["y"], batch[1]["y"]) and torch.equal(back[2][0], batch[2][0])
