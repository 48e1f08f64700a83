"""`shoal run` on token shards: exact resume bit for bit, and a resume on other shards refused by name."""

import json
import shutil
import sysconfig
from pathlib import Path

import pytest

from shoal.data.prepare import prepare
from tests.conftest import TINY, shoal, train_losses

pytestmark = pytest.mark.e2e


@pytest.fixture
def shards(tmp_path):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = [str(stdlib / name) for name in ("json/decoder.py", "json/encoder.py", "csv.py", "textwrap.py")]
    prepare(sources, tmp_path / "shards", tokenizer="bpe", shard_size=20_000, progress=False)
    prepare(sources[:2], tmp_path / "other", tokenizer="bpe", progress=False)
    return tmp_path / "shards"


def test_resume_on_shards_is_exact_and_refuses_other_shards(tmp_path, shards):
    # one worker: the data position is what a resume on shards must restore (layouts and crashes are tests/e2e's)
    args = [*TINY, "launch.nproc=1", "data.source=shards", f"data.path={shards}", "train.steps=8",
            "checkpoint.every=4", "checkpoint.keep=0"]
    clean = shoal("run", *args, "log.name=clean", cwd=tmp_path)
    assert clean.returncode == 0, clean.stderr
    expected = train_losses(tmp_path / "runs" / "clean")
    assert sorted(expected) == list(range(1, 9))

    # the same run stopped after its step-4 checkpoint: a copy without the later checkpoint and records
    run = tmp_path / "runs" / "stopped"
    shutil.copytree(tmp_path / "runs" / "clean", run)
    shutil.rmtree(run / "checkpoints" / "step_00000008")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in lines
                                               if json.loads(line).get("step", 0) <= 4))

    other = shoal("run", *args, f"data.path={tmp_path / 'other'}", "log.name=stopped", "--resume", cwd=tmp_path)
    assert other.returncode == 2
    assert "was made on data shards:" in other.stderr and f"data.path {tmp_path / 'other'} holds shards:" in other.stderr

    resumed = shoal("run", *args, "log.name=stopped", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    after = train_losses(run)
    assert sorted(after) == list(range(1, 9))
    for step, loss in after.items():
        assert loss == expected[step], f"step {step} differs after resume"


def test_a_corrupt_shard_stops_the_run_before_any_worker_starts(tmp_path, shards):
    first = sorted(shards.glob("u*.bin"))[0]
    data = bytearray(first.read_bytes())
    data[10] ^= 0xFF
    first.write_bytes(bytes(data))
    out = shoal("run", *TINY, "data.source=shards", f"data.path={shards}", "train.steps=2", cwd=tmp_path, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip() == f"shoal: error: shard {first}: checksum does not match {shards / 'index.json'} " \
                                 f"(the file changed after `shoal data prepare`; prepare it again)"
    assert not (tmp_path / "runs" / "quickstart" / "logs" / "rank0.log").exists()
