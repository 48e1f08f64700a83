"""Check a fault-tolerant run's sample log: was any sample lost or seen twice, and did the
replicas stay in lockstep?

With SHOAL_SAMPLE_LOG=<folder> every worker appends, per committed step, the step's global
sample ids and a digest of the parameters the step started from (shoal/fault/average.py).
Records of one step written by different workers must agree on the ids, and those of the
same lane on the parameters (a replica group's rank j holds shard j: lane j of every group
must hold identical shards; a whole-model replica is lane 0); the ids of
consecutive steps must be exactly the sampler's permutation, with nothing skipped or
repeated, however often the membership changed.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from shoal.data.sampler import ShardedSampler
from shoal.sync.replica_state import local_tensor


@dataclass
class Audit:
    steps: int = 0
    """Committed steps (0..steps-1 all present when nothing was lost)."""
    missing_steps: list[int] = field(default_factory=list)
    disagreeing_steps: list[int] = field(default_factory=list)
    """Steps whose records differ between workers in ids, or within a lane in parameters (replicas out of step)."""
    wrong_batch_steps: list[int] = field(default_factory=list)
    """Steps that trained on other samples than the sampler's next batch (lost or repeated data)."""
    duplicated: int = 0
    """Sample ids seen more than once within one epoch."""
    sizes: list[int] = field(default_factory=list)
    """Group size of each committed step, in step order."""
    commit_times: list[float] = field(default_factory=list)
    """Earliest time each step was committed, in step order."""
    losses: list[float] = field(default_factory=list)
    """Global mean loss of each committed step, in step order."""

    @property
    def clean(self) -> bool:
        return not (self.missing_steps or self.disagreeing_steps or self.wrong_batch_steps or self.duplicated)


def write_record(path: Path, *, step: int, ids: torch.Tensor, epoch: int, params, loss: float, **where) -> None:
    """Append one committed step's record to a worker's sample log: the step's global batch `ids`
    (every replica's share, so records of the same step can be compared across workers) and a
    digest of the parameters the step started from (replicas in lockstep agree on it; in a
    replica group, a digest of this rank's shards: the same lane of every group must agree).
    `where` names the writer (member, lane, gen, size)."""
    flat = torch.cat([local_tensor(p.detach()).reshape(-1) for p in params])
    record = {"step": step, "t": time.time(), **where, "epoch": epoch,
              "params": hashlib.sha1(flat.numpy().tobytes()).hexdigest(), "loss": loss, "ids": ids.tolist()}
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_records(folder: Path) -> dict[int, list[dict]]:
    by_step: dict[int, list[dict]] = defaultdict(list)
    for path in sorted(Path(folder).glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():  # a worker killed mid-write leaves at most a torn last line
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                by_step[record["step"]].append(record)
    return by_step


def audit(folder: Path, *, num_samples: int, global_batch: int, grad_accum: int, seed: int) -> Audit:
    """Compare the sample log in `folder` with the batches an uninterrupted run trains on."""
    by_step = read_records(folder)
    result = Audit(steps=max(by_step) + 1 if by_step else 0)
    sampler = ShardedSampler(num_samples, global_batch // grad_accum, seed)
    seen: dict[int, set[int]] = defaultdict(set)
    for step in range(result.steps):
        expected = torch.cat([sampler.next_batch(0, 1) for _ in range(grad_accum)]).tolist()
        epoch = sampler.epoch  # the batch's own epoch (a step's start may be the previous one's end)
        records = by_step.get(step)
        if not records:
            result.missing_steps.append(step)
            continue
        first = records[0]
        lanes: dict[int, str] = {}
        for r in records:
            lanes.setdefault(r.get("lane", 0), r["params"])
        if any(r["ids"] != first["ids"] or r["params"] != lanes[r.get("lane", 0)] for r in records[1:]):
            result.disagreeing_steps.append(step)
        if first["ids"] != expected:
            result.wrong_batch_steps.append(step)
        epoch_seen = seen[epoch]
        result.duplicated += sum(1 for i in first["ids"] if i in epoch_seen)
        epoch_seen.update(first["ids"])
        result.sizes.append(first["size"])
        result.commit_times.append(min(r["t"] for r in records))
        result.losses.append(first["loss"])
    return result
