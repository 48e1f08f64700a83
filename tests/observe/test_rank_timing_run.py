"""Real runs with a deliberately slow rank (tests/observe/slow_model.py sleeps in its forward):
the per-rank records name it, and under fault tolerance a SIGKILLed worker shows as events
(died with its signal, replaced, regrouped with the recovery time, left) in metrics.jsonl and
in `shoal report`."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.conftest import ROOT, SHOAL, metric_records

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

JOB = ["model.name=mlp", "data.source=synthetic", "model.factory=tests.observe.slow_model:build",
       "train.batch_size=32", "train.eval_every=0", "train.warmup_steps=2", "log.every=5", "log.progress=plain",
       "log.tensorboard=false"]


def shoal_run(args: list[str], cwd, slow_rank: int) -> tuple[subprocess.CompletedProcess, list[dict]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SHOAL_TEST_SLOW_RANK": str(slow_rank),
           "SHOAL_TEST_SLOW_SECONDS": "0.03"}
    out = subprocess.run([SHOAL, "run", *JOB, *args], cwd=cwd, capture_output=True, text=True, timeout=200,
                         stdin=subprocess.DEVNULL, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out, metric_records(cwd / "runs" / "quickstart")


def test_ddp_slow_rank_arrives_late_and_is_named(tmp_path):
    out, records = shoal_run(["launch.nproc=2", "train.steps=30"], tmp_path, slow_rank=1)
    ranks = [r for r in records if r.get("kind") == "ranks"]
    assert [r["step"] for r in ranks] == [5, 10, 15, 20, 25, 30]  # one gather per log.every steps
    for r in ranks:
        assert r["slowest_rank"] == "1" and r["slowest_by"] > 0.2
        compute = dict(zip(r["per_rank"]["rank"], r["per_rank"]["compute"]))
        assert compute["1"] >= 0.03 > compute["0"]  # the sleep shows in rank 1's compute only
        assert r["arrival_max"] >= 0.03
    train = [r for r in records if r.get("kind") == "train"]
    # Rank 0 (which logs) is fast: under DDP its step is as long as the slow rank's, spent waiting.
    # On most steps, not all: on a loaded machine the scheduler can hold rank 0 longer than the sleep.
    waits = sorted(r["comm_seconds"] - r["compute_seconds"] for r in train[5:])
    assert waits[len(waits) // 2] > 0, waits
    stragglers = [r for r in records if r.get("event") == "straggler"]
    assert [(e["step"], e["rank"]) for e in stragglers] == [(15, "1")]  # named once, after 3 windows
    assert "rank 1 is a straggler" in out.stdout


def test_killed_worker_and_slow_rank_under_fault_tolerance(tmp_path):
    _, records = shoal_run(["launch.nproc=3", "train.steps=80", "fault.enabled=true", "fault.step_timeout=5",
                            "checkpoint.every=40", "--chaos", "kill=2,step=20"], tmp_path, slow_rank=1)
    events = [r for r in records if r.get("kind") == "event"]
    assert all({"time", "step", "event"} <= e.keys() for e in events)
    died = [e for e in events if e["event"] == "died"]
    assert [(e["member"], e["signal"]) for e in died] == [(2, "SIGKILL")]
    assert [e["member"] for e in events if e["event"] == "replaced"] == [2]
    regroups = [e for e in events if e["event"] == "regrouped"]
    assert regroups[0]["size"] == 3 and regroups[1]["size"] == 2  # the world size over time
    assert 0 <= regroups[1]["recovery_seconds"] < 30 and regroups[1]["time"] >= died[0]["time"]
    assert [e["member"] for e in events if e["event"] == "left"] == [2]
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [40, 80]
    train = [r for r in records if r.get("kind") == "train"]
    assert {r["world_size"] for r in train} >= {2, 3}
    ranks = [r for r in records if r.get("kind") == "ranks"]
    # Members are named by number. The slow rank is the slowest in most windows; a replacement's
    # first steps after it joins (caches still cold) may be slower still, but no other member's are.
    joiners = {str(e["member"]) for e in events if e["event"] == "joined" and e["time"] > died[0]["time"]}
    named = [r["slowest_rank"] for r in ranks]
    assert named.count("1") > len(named) / 2 and set(named) <= {"1"} | joiners, (named, joiners)
    assert [e["rank"] for e in events if e["event"] == "straggler"] == ["1"]

    report = subprocess.run([SHOAL, "report", "runs/quickstart"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert report.returncode == 0, report.stderr
    text = (tmp_path / "runs" / "quickstart" / "report.md").read_text()
    assert "1 worker lost (1 SIGKILL), 1 replaced, median recovery" in text
    assert "slowest rank: 1" in text and "straggler from step" in text
