"""Per-rank timing: which rank is slow, found where it shows.

Under DDP every rank's step lasts as long as the slowest one's, because the gradient
all-reduce waits for it: a compute straggler does not show as a longer step, but as a late
*arrival* at the collective, while the other ranks wait there (the point of traceml's
straggler view, and of Megatron's straggler detector, which times each rank's compute).
So each rank keeps, per step, its data wait, its compute (start of step to arrival at the
gradient collective, less the data wait) and its arrival time; every `every` steps the
medians of that window travel to the logging rank in one small exchange, not one per step:

- with a default process group and a loss averaged every step, inside that all-reduce: each
  rank adds its 3 floats in its own slots of a block that is zero elsewhere, so the sum is
  every rank's values, exactly, and the window costs no collective of its own
  (`Trainer.means_and_stop`); where the loss is averaged later (outer-sync methods), one
  `all_gather_into_tensor` of 3 floats per rank at the window's end;
- under per-step fault tolerance (no default group; members change), through the job's
  c10d store: each member sets its window's values and the logging member reads the
  previous window's, which every member has written once the current window's steps ran
  (they all-reduced together), so nobody waits.

The logging rank writes one `kind: "ranks"` record per window: min, median and max of each
quantity over the ranks, the slowest rank and by how much it is slower than the median of
the others. A rank slower by more than `STRAGGLER_FRACTION` for `STRAGGLER_WINDOWS` windows
in a row is named on the progress line and as a `straggler` event.
"""

from __future__ import annotations

import json
import statistics
from typing import Callable

import torch
import torch.distributed as dist

from shoal.runtime import protocol

FIELDS = ("data", "compute", "arrival")
STRAGGLER_FRACTION = 0.2
"""A rank whose compute exceeds the median of the others by this fraction is slow."""
STRAGGLER_WINDOWS = 3
"""... for this many windows in a row before it is named (one slow window is noise)."""
PER_RANK_LIMIT = 64
"""Up to this many ranks a record lists every rank's values (the report's plot); above, only the summary."""

Gather = Callable[[int, list[float]], "tuple[list[str], list[list[float]]] | None"]
"""(window, this rank's values) -> (rank labels, every rank's values), or None on a rank that does not log."""


def gather_over_group(window: int, values: list[float]) -> tuple[list[str], list[list[float]]]:
    """Every rank's values over the default process group (one all-gather); labels are global ranks."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return ["0"], [values]
    # NCCL gathers only GPU tensors; Gloo takes CPU ones
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    mine = torch.tensor(values, dtype=torch.float64, device=device)
    everyone = torch.empty(dist.get_world_size() * len(values), dtype=torch.float64, device=device)
    dist.all_gather_into_tensor(everyone, mine)
    rows = everyone.view(dist.get_world_size(), len(values)).tolist()
    return [str(rank) for rank in range(len(rows))], rows


def gather_over_store(store, *, label: str, members: Callable[[], list[str]], logs: Callable[[], bool]) -> Gather:
    """A `Gather` through the fault-tolerant job's store: this member publishes `window`'s values;
    the logging member reads the previous window's from every current member that wrote one."""

    def gather(window: int, values: list[float]) -> tuple[list[str], list[list[float]]] | None:
        store.set(protocol.timing(window, label), json.dumps(values))
        if window >= 2:
            store.delete_key(protocol.timing(window - 2, label))
        if not logs() or window < 1:
            return None
        labels, rows = [], []
        for other in members():
            key = protocol.timing(window - 1, other)
            if store.check([key]):
                labels.append(other)
                rows.append(json.loads(store.get(key)))
        return labels, rows

    return gather


class RankTiming:
    """This rank's per-step timing, and every `every` steps the summary over the ranks."""

    def __init__(self, every: int, gather: Gather):
        self.every, self.gather = every, gather
        self.window: list[tuple[float, float, float]] = []
        self.slow_rank: str | None = None
        self.slow_windows = 0
        self.named: str | None = None  # the straggler named last (named once until it changes)

    def add(self, *, data: float, compute: float, arrival: float) -> None:
        self.window.append((data, compute, arrival))

    def due(self, step: int) -> list[float] | None:
        """This rank's medians of the window when `step` ends one (what travels to the logging
        rank), else None."""
        if step % self.every or not self.window:
            return None
        return [round(statistics.median(column), 6) for column in zip(*self.window)]

    def summary(self, step: int, gathered: tuple[list[str], list[list[float]]] | None = None) -> dict | None:
        """At a window's end (every rank calls it at the same step): the `ranks` record, on the
        logging rank (None elsewhere, and between windows). `gathered`: every rank's `due(step)`
        when an exchange the step made anyway carried them (the Trainer's loss all-reduce);
        otherwise this exchanges them through `gather`."""
        medians = self.due(step)
        if medians is None:
            return None
        steps = len(self.window)
        self.window.clear()
        if gathered is None:
            gathered = self.gather(step // self.every, medians)
        if gathered is None or not gathered[0]:
            return None
        labels, rows = gathered
        record: dict = {"kind": "ranks", "step": step, "steps": steps, "ranks": len(labels)}
        for index, name in enumerate(FIELDS):
            column = [row[index] for row in rows]
            record.update({f"{name}_min": min(column), f"{name}_median": statistics.median(column),
                           f"{name}_max": max(column)})
        compute = [row[1] for row in rows]
        slowest = max(range(len(rows)), key=compute.__getitem__)
        others = compute[:slowest] + compute[slowest + 1:]
        slower = compute[slowest] / max(statistics.median(others), 1e-9) - 1 if others else 0.0
        record.update({"slowest_rank": labels[slowest], "slowest_by": round(slower, 4),
                       "others_compute_median": statistics.median(others) if others else compute[slowest]})
        if len(labels) <= PER_RANK_LIMIT:
            record["per_rank"] = {"rank": labels, **{name: [row[i] for row in rows] for i, name in enumerate(FIELDS)}}
        return record

    def straggler(self, record: dict) -> tuple[str, float] | None:
        """(rank, fraction slower) when `record` makes one rank a straggler for the first time
        (slower than STRAGGLER_FRACTION for STRAGGLER_WINDOWS windows in a row)."""
        slow = record["slowest_by"] > STRAGGLER_FRACTION
        rank = record["slowest_rank"] if slow else None
        self.slow_windows = self.slow_windows + 1 if slow and rank == self.slow_rank else int(slow)
        self.slow_rank = rank
        if slow and self.slow_windows >= STRAGGLER_WINDOWS and self.named != rank:
            self.named = rank
            return rank, record["slowest_by"]
        if not slow:
            self.named = None
        return None
