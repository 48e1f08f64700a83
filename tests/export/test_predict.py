"""`shoal predict`: parts over workers equal one worker's, a killed run resumes without
recomputing or repeating a row, and data that does not fit the model is refused in one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import numpy as np
import pytest
import pyarrow.parquet as pq
import torch

from shoal.export.predict import predict
from tests.conftest import SHOAL, wait_for
from tests.export.conftest import CLASSES, FEATURES, ROWS, one_line_error, shoal_here


def read_all(out) -> dict:
    index = json.loads((out / "index.json").read_text())
    tables = [pq.read_table(out / part["file"]) for part in index["parts"]]
    return {name: np.concatenate([np.stack(t.column(name).to_pylist()) for t in tables])
            for name in ("id", "prediction", "score", "probabilities")}


@pytest.mark.slow
def test_two_workers_equal_one(classifier, tmp_path):
    run_dir, data = classifier
    threads = torch.get_num_threads()
    one = predict(run_dir, [str(data)], tmp_path / "one", nproc=1, part_rows=300, batch_size=64, threads=1)
    assert torch.get_num_threads() == threads  # the caller's thread count is given back
    two = predict(run_dir, [str(data)], tmp_path / "two", nproc=2, part_rows=300, batch_size=64)
    assert one["parts"] == two["parts"] and len(one["parts"]) == 4
    a, b = read_all(tmp_path / "one"), read_all(tmp_path / "two")
    assert list(a["id"]) == list(range(ROWS))
    assert (a["id"] == b["id"]).all() and (a["prediction"] == b["prediction"]).all()
    np.testing.assert_allclose(a["probabilities"], b["probabilities"], rtol=0, atol=1e-6)
    assert a["probabilities"].shape == (ROWS, CLASSES)
    np.testing.assert_allclose(a["probabilities"].sum(1), 1, atol=1e-5)
    assert (a["prediction"] == a["probabilities"].argmax(1)).all()


@pytest.mark.slow
def test_killed_run_resumes_and_writes_every_row_once(classifier, tmp_path):
    run_dir, data = classifier
    out = tmp_path / "out"
    args = [SHOAL, "predict", str(run_dir), "--data", str(data), "--out", str(out), "--nproc", "2",
            "--part-rows", "50", "--batch-size", "10"]
    proc = subprocess.Popen(args, cwd=tmp_path, start_new_session=True, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: list(out.glob("part-*.parquet")) or proc.poll() is not None, 180, "the first part file")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # However far the killed run got, leave the state a kill halfway leaves: the first half of
    # the parts written, the rest missing, one of them half-written under its temporary name.
    parts = sorted(out.glob("part-*.parquet"))
    assert parts, "the run was killed after its first part"
    for path in parts[12:]:
        path.unlink()
    (out / "index.json").unlink(missing_ok=True)
    (out / ".part-00013.parquet.tmp-99999").write_bytes(b"PAR1 half")
    kept = {path.name: os.stat(path).st_mtime_ns for path in out.glob("part-*.parquet")}
    predict(run_dir, [str(data)], out, nproc=1, part_rows=50, batch_size=10)  # the rerun, here: one worker
    rows = read_all(out)
    assert sorted(rows["id"]) == list(range(ROWS))  # every row exactly once
    assert len(json.loads((out / "index.json").read_text())["parts"]) == ROWS // 50
    for name, mtime in kept.items():  # finished parts were not recomputed
        assert os.stat(out / name).st_mtime_ns == mtime, name
    assert not list(out.glob(".*tmp*"))


def test_data_that_does_not_fit_is_refused_in_one_line(classifier, tmp_path, capfd):
    run_dir, _ = classifier
    np.save(tmp_path / "wide.npy", np.zeros((10, FEATURES + 1), np.float32))
    one_line_error(shoal_here(capfd, "predict", str(run_dir), "--data", str(tmp_path / "wide.npy"), "--out",
                              str(tmp_path / "out")), "7 feature columns", "takes 6")
    assert not (tmp_path / "out").exists()


def test_federated_run_directory_is_scored(classifier, tmp_path):
    """`shoal fed server` leaves config.toml and model.safetensors, no checkpoint folder."""
    from safetensors.torch import save_file

    from shoal.export.consolidate import consolidate
    mlp_dir, data = classifier
    fed = tmp_path / "banks"
    fed.mkdir()
    (fed / "config.toml").write_text("[model]\nname = \"mlp\"\n")
    trained = consolidate(mlp_dir, progress=False)
    save_file(trained.model.state_dict(), str(fed / "model.safetensors"))
    predict(fed, [str(data)], tmp_path / "out", part_rows=500)
    rows = read_all(tmp_path / "out")
    with torch.no_grad():
        expected = torch.softmax(trained.model(torch.from_numpy(np.load(data / "x.npy"))), -1).numpy()
    np.testing.assert_allclose(rows["probabilities"], expected, atol=1e-6)
