"""A DiLoCo run killed mid-training and resumed repeats the uninterrupted run's losses bit for bit.

The checkpoints fall between outer syncs (every 6 steps, H = 4), so the replicas hold different
weights and inner-optimizer moments when saved, and a fragment's average is still in flight.
"""

import re

import pytest

from tests.conftest import TINY, crash_after_checkpoint, metric_records, shoal

pytestmark = pytest.mark.e2e

STEPS, EVERY, INNER = 24, 6, 4


def test_diloco_resume_after_a_crash_repeats_the_uninterrupted_losses_bit_for_bit(tmp_path):
    # Streaming with overlap holds the most state: outer parameters and momentum per fragment, the
    # step count, each replica's own weights and AdamW moments, and an average in flight (fragment 0
    # at steps 6 and 18, fragment 1 at 12). Plain DiLoCo (fragments=1, no overlap) is a subset of it.
    args = [*TINY, f"train.steps={STEPS}", f"checkpoint.every={EVERY}", "checkpoint.keep=0", "log.every=5",
            "parallel.dp_replicate=2", "sync.method=diloco", f"sync.inner_steps={INNER}", "sync.compression=int8",
            "sync.fragments=2", "sync.overlap=true"]
    clean = shoal("run", *args, "log.name=clean", cwd=tmp_path)
    assert clean.returncode == 0, clean.stderr
    expected = {r["step"]: r["loss"] for r in metric_records(tmp_path / "runs" / "clean", "train")}
    assert sorted(expected) == list(range(1, STEPS + 1))

    crash_after_checkpoint(args, tmp_path, "crash", EVERY)  # launcher and both workers die at once
    run = tmp_path / "runs" / "crash"
    before = metric_records(run, "train")
    assert not before or before[-1]["step"] < STEPS, "the run finished before it could be killed"

    resumed = shoal("run", *args, "log.name=crash", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    start = int(re.search(r"resumed from \S+ at step (\d+)", resumed.stdout).group(1))
    assert start % EVERY == 0 and start % INNER != 0 and start < STEPS  # between outer syncs
    assert "outer optimizer starts afresh" not in resumed.stdout
    # Each step at most once: the killed attempt's records after its checkpoint (how many slipped in
    # before the kill depends on the machine's load) were dropped at resume; the resumed attempt wrote
    # every step after its checkpoint. (DiLoCo's records are written every log.every steps, so those
    # of the killed attempt's last steps before its checkpoint may never have been written.)
    records = metric_records(run, "train")
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), steps
    after = [r for r in records if r["step"] > start]
    assert [r["step"] for r in after] == list(range(start + 1, STEPS + 1))
    for r in after:
        assert r["loss"] == expected[r["step"]], f"step {r['step']} differs after resume"
