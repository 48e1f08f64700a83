"""How far the replicas of a fault-tolerant job are, for the launcher's progress display
(shoal/observe/fleet.py), through the membership store: the launcher shows the job's progress
because any worker, the first included, may die.
"""

from __future__ import annotations

import json
import time
from typing import Any

from shoal.fault.generation import Generation
from shoal.fault.store import ReplicaStore
from shoal.runtime import protocol as keys

PUBLISH_EVERY = 0.1
"""Seconds between progress records (the launcher's display reads one every 0.25 s): a store round
trip per step costs a few percent of a small model's step."""


class Progress:
    """Tells the launcher's progress display (shoal/observe/fleet.py) how far the replicas are."""

    def __init__(self, store: ReplicaStore, generation: Generation, *, total_steps: int):
        self.store, self.generation, self.total_steps = store, generation, total_steps
        self.committed = False  # whether the launcher was told that this member committed a step
        self.published = -PUBLISH_EVERY  # when progress was last published (time.monotonic())

    def publish(self, step: int, loss: float, **extra: Any) -> None:
        """`step` steps are done: every PUBLISH_EVERY seconds, and always the first step, the last
        and an outer sync (`extra`)."""
        now = time.monotonic()
        if extra or not self.committed or step >= self.total_steps or now - self.published >= PUBLISH_EVERY:
            generation = self.generation
            self.store.set(keys.PROGRESS, json.dumps({"step": step, "loss": loss, "gen": generation.number,
                                                      "size": generation.size, **extra}))
            self.published = now
        if not self.committed:  # once: a later crash of this member is then no crash loop
            self.store.set(keys.committed(self.store.replica.member), "1")
            self.committed = True
