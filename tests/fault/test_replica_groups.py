"""Per-step fault tolerance for replica groups (HSDP-like: parallel.dp_replicate = 2 groups of
parallel.dp_shard = 2 workers, each group sharding one full copy with FSDP2), with real
processes and real signals: a worker of a group SIGKILLed before, during and after the
cross-group all-reduce, and one SIGSTOPped past the step timeout. The other group must never
crash, the failed group must be restarted whole and rejoin with its shards from the same lane
of the live group, lane j of every group must hold identical shards after every committed
step, no sample may be lost or repeated, and the final loss must match a clean one-process
run. A layout without a replica (FSDP over every worker) falls back to restart-from-checkpoint
and says so."""

from __future__ import annotations

import json
import os
import subprocess
from collections import defaultdict

import pytest
import torch

from shoal import config
from shoal.config import ConfigError
from shoal.data.sampler import ShardedSampler
from shoal.fault.audit import audit, read_records
from shoal.runtime.protocol import SAMPLE_LOG_ENV
from shoal.launch.supervisor import check_fault_tolerant
from tests.conftest import SHOAL, shoal
from tests.fault.test_recovery import FT, assert_same_training, one_process_losses

pytestmark = pytest.mark.timeout(180)

GROUPS = ["launch.nproc=4", "parallel.dp_replicate=2", "parallel.dp_shard=2"]
# Slots 0, 1 are group 0's lanes 0, 1 at launch; 2, 3 group 1's. A restarted group keeps its slots.
# In order; each waits for both groups to be in the generation again (size=2).
SCENARIO = ";".join([
    "kill=1,step=5,at=before",
    "kill=2,step=15,at=during,size=2",
    "kill=3,step=25,at=after,size=2",  # its lane committed; its group's other lane did not: the group dies whole
    "hang=0,step=35,at=before,for=6s,size=2",  # past the 3 s step timeout: left out, killed, restarted
])
STEPS = 90


@pytest.mark.slow
def test_replica_groups_survive_kills_and_a_hang(tmp_path):
    samples = tmp_path / "samples"
    samples.mkdir()
    proc = subprocess.Popen([SHOAL, "run", *FT, *GROUPS, f"train.steps={STEPS}", "--chaos", SCENARIO],
                            cwd=tmp_path, text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env={**os.environ, SAMPLE_LOG_ENV: str(samples)})
    try:  # the one-process reference trains here meanwhile
        reference, num_samples = one_process_losses([*FT, f"train.steps={STEPS}"], tmp_path)
        _, stderr = proc.communicate(timeout=150)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    run = tmp_path / "runs" / "quickstart"
    events = [json.loads(line) for line in (run / "logs" / "fault_events.jsonl").read_text().splitlines()]

    # Exactly the four injected failures, each taking down only its own group: the worker hit
    # (-9), and its group peer, killed by the supervisor (-9, with_group) or ended by its own
    # broken group (1).
    exits = [e for e in events if e["event"] == "exit"]
    hit = [e for e in exits if e["code"] == -9 and not e.get("with_group")]
    assert [e["slot"] for e in hit] == [1, 2, 3, 0], (exits, stderr[-2000:])
    failed = {e["member"] for e in hit}
    assert len(failed) == 4
    for member in failed:
        codes = sorted(e["code"] for e in exits if e["member"] == member)
        assert codes in ([-9, -9], [-9, 1]), (member, exits)  # both workers of the group, nothing else
    assert all(e["code"] == 0 for e in exits if e["member"] not in failed), exits  # the others never crashed
    starts = [e for e in events if e["event"] == "start"]
    assert len(starts) == 4 + 4 * 2, starts  # every failed group restarted whole
    assert "left out as hung" in stderr and "was left out as hung; restarting it" in stderr
    logs = "".join(p.read_text() for p in (run / "logs").glob("rank*.log"))
    assert "did not arrive: rank" in logs and "lane 0) last seen 'step" in logs  # the hang is named, with its place

    # Restarted groups rejoined with state from a live group and trained to the end.
    joined = [e["text"] for e in events if e["event"] == "log" and "state from replica group" in e["text"]]
    assert len(joined) >= 4, joined
    records = read_records(samples)
    finishers = {(r["member"], r["lane"]) for r in records[STEPS - 1]}
    assert len(finishers) == 4 and not {m for m, _ in finishers} & failed, finishers

    # Lane j of every group holds identical shards after every step (the audit compares the
    # parameter digests within each lane), and both groups were there for most steps.
    result = audit(samples, num_samples=num_samples, global_batch=32, grad_accum=1, seed=1234)
    assert result.steps == STEPS and result.clean, result
    assert set(result.sizes) == {1, 2}
    both = 0
    for step, rows in records.items():
        lanes = defaultdict(set)
        for r in rows:
            lanes[r["lane"]].add(r["member"])
        assert set(lanes) == {0, 1}, (step, rows)  # every lane of a committing group logs the step
        both += all(len(members) == 2 for members in lanes.values())
    assert both >= STEPS // 2, both  # a restarted group is back within a few steps of each failure
    assert_same_training(result.losses, reference, through=STEPS)


@pytest.mark.slow
def test_layout_without_a_replica_falls_back_to_restarts(tmp_path):
    out = shoal("run", *FT, "launch.nproc=2", "parallel.dp_replicate=1", "parallel.dp_shard=2", "train.steps=3",
                cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "has no replica to drop" in out.stderr
    assert "falling back to restarting every worker from the last checkpoint" in out.stderr


@pytest.mark.parametrize("layout, per_step", [
    (["launch.nproc=4", "parallel.dp_shard=2"], True),  # dp_replicate fills: 2 groups of 2
    (["launch.nproc=4", "parallel.dp_replicate=2", "parallel.dp_shard=2"], True),
    (["launch.nproc=4", "parallel.dp_shard=4"], False),  # pure FSDP: no replica
    (["launch.nproc=4", "parallel.dp_shard=-1"], False),
    (["launch.nproc=4", "parallel.dp_shard=2", "parallel.tp=2"], False),
])
def test_which_layouts_get_per_step_recovery(layout, per_step):
    cfg = config.load(None, ["fault.enabled=true", *layout])
    assert check_fault_tolerant(cfg, 4, None) is per_step


def test_replica_group_needs_equal_shares_and_no_outside_workers():
    cfg = config.load(None, ["fault.enabled=true", *GROUPS, "train.batch_size=33"])
    with pytest.raises(ConfigError, match="must divide by parallel.dp_shard = 2"):
        check_fault_tolerant(cfg, 4, None)
    cfg = config.load(None, ["fault.enabled=true", *GROUPS, "fault.max_workers=6"])
    with pytest.raises(ConfigError, match="run on one host and cannot take workers from elsewhere"):
        check_fault_tolerant(cfg, 4, None)
    with pytest.raises(ConfigError, match="has no replica to drop"):
        check_fault_tolerant(config.load(None, ["fault.enabled=true", "launch.nproc=4", "parallel.dp_shard=4"]), 4,
                             "kill=random,every=5s")


@pytest.mark.parametrize("groups", [1, 2, 3])
def test_group_shares_are_equal_inside_each_group(groups):
    """Ranks take share (group * S + lane) of (groups * S): with a micro-batch that divides by S,
    the S ranks of a group get equal shares (FSDP's plain mean is then the group's weighted mean),
    and all shares together are the global batch."""
    size = 2
    parts = [ShardedSampler(100, 32, 1).next_batch(g * size + lane, groups * size)
             for g in range(groups) for lane in range(size)]
    for g in range(groups):
        assert len(parts[g * size]) == len(parts[g * size + 1])
    assert torch.equal(torch.cat(parts), ShardedSampler(100, 32, 1).next_batch(0, 1))


def test_audit_compares_shards_within_a_lane(tmp_path):
    ids = ShardedSampler(64, 8, 5).next_batch(0, 1).tolist()
    row = {"step": 0, "t": 0, "gen": 1, "size": 2, "epoch": 0, "loss": 1.0, "ids": ids}
    rows = [{**row, "member": m, "lane": lane, "params": f"shard{lane}"} for m in (0, 1) for lane in (0, 1)]
    (tmp_path / "log.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert audit(tmp_path, num_samples=64, global_batch=8, grad_accum=1, seed=5).clean  # lanes differ: fine
    rows[3]["params"] = "diverged"  # group 1's lane 1 is not group 0's lane 1
    (tmp_path / "log.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert audit(tmp_path, num_samples=64, global_batch=8, grad_accum=1, seed=5).disagreeing_steps == [0]
