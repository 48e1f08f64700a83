"""The stdlib corpus holds out whole files chosen by their path hash, spread over the corpus,
about val_fraction of its bytes: not its tail (one corner of the library, which read as a
validation loss far below the training loss)."""

import sysconfig
from pathlib import Path

from shoal.config import load
from shoal.data import build_dataset
from shoal.data.datasets import held_out_files, stdlib_files


def test_validation_is_whole_files_spread_over_the_corpus():
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files(4_000_000)
    held = held_out_files(files, root, 0.05)
    share = sum(f.stat().st_size for f in held) / sum(f.stat().st_size for f in files)
    assert 0.03 < share <= 0.05
    positions = sorted(files.index(f) / len(files) for f in held)
    assert positions[0] < 0.25 and positions[-1] > 0.75  # from the whole corpus, not its tail
    assert held == held_out_files(files, root, 0.05)  # the same on every call (and machine)
    assert held_out_files(files[:1], root, 0.05) == set() and held_out_files(files, root, 0.0) == set()


def test_stdlib_split_sizes(tmp_path):
    cfg = load(None, ["data.max_bytes=400000", "data.seq_len=64", f"data.cache_dir={tmp_path}"])
    train, val, _ = build_dataset(cfg.data)
    assert 0.02 < len(val) / (len(train) + len(val)) <= 0.05
