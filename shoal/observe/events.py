"""Events of a run: what happened to it besides its steps, as records in metrics.jsonl.

Every event is one JSON line of one shape, made by `event_record`:

    {"time": 1733300000.123, "kind": "event", "event": "died", "step": 41, ...fields}

`time` is the wall clock (seconds since the epoch) and `step` the last committed step when it
happened, so a report can draw it on the loss curve. Events come from two writers that share
the file: the worker that logs now (checkpoint, resumed, preempted, outer_sync, straggler) and
the fault-tolerant launcher, which outlives every worker (died, replaced, regrouped, joined,
left, preempted). Each line is one `write` to a file opened for appending, so the two never
interleave inside a line. Validation results stay `kind: "eval"` records (they are a curve).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

EVENTS = {
    "died": "a worker exited with a failure: `code` (its exit code) or `signal` (the signal that killed it)",
    "replaced": "a replacement for a dead worker was started (`member` is the dead one, `delay` the back-off)",
    "regrouped": "a new generation of replicas formed: `members`, `size` (the world size from now on), "
                 "`recovery_seconds` since the failure that broke the last one",
    "joined": "a replica became a member (`member`), in generation `gen`",
    "left": "a replica stopped being a member (`member`): it died, was left out as hung, or left after a signal",
    "preempted": "a stop signal (`signal`) ended the run with a checkpoint",
    "checkpoint": "a checkpoint of `step` was written (`seconds` the save blocked training)",
    "resumed": "training continued from the checkpoint `path` at `step`",
    "outer_sync": "an outer sync (DiLoCo, local SGD) averaged the replicas (`seconds` it took on the logging rank)",
    "straggler": "rank `rank` reached the gradient collective `slower` (fraction) later than the median rank",
}
"""Every event name, with what its fields mean (docs/observe.md lists the same)."""


def event_record(event: str, step: int, **fields: Any) -> dict[str, Any]:
    """The one shape of an event record; `time` is now unless given."""
    if event not in EVENTS:
        raise ValueError(f"unknown event {event!r}: one of {', '.join(EVENTS)}")
    record = {"time": round(fields.pop("time", time.time()), 3), "kind": "event", "event": event, "step": int(step)}
    record.update(fields)
    return record


def append_event(path: Path, event: str, step: int, **fields: Any) -> dict[str, Any]:
    """Append one event to `path` (a metrics.jsonl) in a single write; returns the record."""
    record = event_record(event, step, **fields)
    with Path(path).open("a") as out:
        out.write(json.dumps(record) + "\n")
    return record


def events_of(records: list[dict[str, Any]], *names: str) -> list[dict[str, Any]]:
    """The event records among `records` (of the given names, or all)."""
    return [r for r in records if r.get("kind") == "event" and (not names or r.get("event") in names)]
