"""Progress of a fault-tolerant job, shown by its launcher.

In fault-tolerant mode any worker may die, so none of them owns the terminal: each member
publishes its last committed step to the membership store (`ft/progress`: step, loss,
generation, group size) and the launcher, which outlives every worker, draws the bar from
there. The bar goes on through failures; its text says how many workers train now.
"""

from __future__ import annotations

import json
import time

from shoal.runtime.protocol import PROGRESS as PROGRESS_KEY
from shoal.observe.progress import Progress


class FleetProgress:
    """Polls the store's progress record and drives a `Progress` bar or plain lines."""

    def __init__(self, store, total_steps: int, *, mode: str, every: int, samples_per_step: int,
                 interval: float = 0.25):
        self.store, self.samples_per_step, self.interval = store, samples_per_step, interval
        self.progress = Progress(total_steps, 0, mode=mode, every=every, unit="samples")
        self.last_poll = 0.0
        self.last_step, self.last_time = 0, time.perf_counter()
        self.size = 0

    def poll(self, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        if now - self.last_poll < self.interval:
            return
        self.last_poll = now
        if not self.store.check([PROGRESS_KEY]):
            return
        record = json.loads(self.store.get(PROGRESS_KEY))
        step = int(record["step"])
        if step <= self.last_step:
            return
        rate = (step - self.last_step) * self.samples_per_step / max(now - self.last_time, 1e-9)
        if record.get("size") != self.size and self.size:
            self.progress.message(f"step {step}: {record['size']} worker(s) training (generation {record['gen']})")
        self.size = record.get("size", self.size)
        self.last_step, self.last_time = step, now
        self.progress.update(step, float(record["loss"]), rate)

    def close(self) -> None:
        self.progress.close()
