"""What the Trainer reports of each step: the loss averaged over the data-parallel ranks (at
once, or deferred for outer-sync methods), metrics.jsonl and TensorBoard on whichever worker
logs now, and the progress display.

Under fault tolerance the logging worker can change mid-run (the first worker of the current
generation logs, shoal/fault/elastic.py). A worker that takes over appends the records of the
steps its predecessor committed but did not live to write, so every committed step has its
record once.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from pathlib import Path
from typing import Callable

import torch

from shoal.observe.events import event_record
from shoal.observe.metrics import MetricsLog
from shoal.observe.progress import Progress

log = logging.getLogger("shoal")

Averager = Callable[[torch.Tensor], "tuple[torch.Tensor, bool]"]
"""Averages a vector of losses over the data-parallel ranks; also says whether a rank was asked to stop."""


def last_logged_step(path: Path) -> int:
    """The step of the last training record in a metrics.jsonl (-1 when there is none)."""
    if not path.is_file():
        return -1
    with path.open("rb") as file:
        file.seek(max(0, file.seek(0, 2) - 65536))
        lines = file.read().decode(errors="replace").splitlines()
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the first line of the tail may be cut
        if record.get("kind") == "train":
            return int(record["step"])
    return -1


class StepReporter:
    """Collects each step's loss and fields, averages and logs them, and draws progress."""

    def __init__(self, run_dir: Path, *, total_steps: int, start_step: int, unit: str, progress_mode: str,
                 every: int, tensorboard: bool, writes_metrics: Callable[[], bool], average: Averager,
                 loggers: Callable[[], list] = list):
        self.run_dir, self.every, self.tensorboard, self.unit = Path(run_dir), every, tensorboard, unit
        self.loggers = loggers  # opens MLflow / W&B when this worker starts logging
        self.writes_metrics, self.average = writes_metrics, average
        self.progress = Progress(total_steps, start_step, mode=progress_mode, every=every, unit=unit)
        self.metrics: MetricsLog | None = None
        self.losses: list[float] = []
        self.unsent: list[tuple[torch.Tensor, dict]] = []
        self.recent: deque[dict] = deque(maxlen=256)  # what a worker that takes over the log may owe

    def add(self, loss: torch.Tensor, record: dict) -> None:
        """A committed step: its loss (this rank's, or already averaged) and its other fields."""
        self.unsent.append((loss.detach().reshape(()), record))

    def publish(self, averaged: bool) -> bool:
        """Log the steps added since the last call; True when a rank was asked to stop.

        With `averaged` false the losses are averaged here, in one all-reduce for all of them.
        In fp64 a sum of a few fp32 losses is exact in any order, so the logged means do not
        depend on how the all-reduce splits the vector (a resumed run's first one is shorter)."""
        if not self.unsent:
            return False
        means, stop = [float(loss) for loss, _ in self.unsent], False
        if not averaged:
            averages, stop = self.average(torch.stack([loss for loss, _ in self.unsent]).double())
            means = averages.tolist()
        for loss, (_, fields) in zip(means, self.unsent):
            record = {"kind": "train", "step": fields["step"], "loss": loss, **fields}
            self.losses.append(loss)
            self.progress.update(record["step"], loss, record[f"{self.unit}_per_second"])
            self.log(record)
        self.unsent.clear()
        return stop

    def evaluated(self, step: int, val_loss: float) -> None:
        self.progress.message(f"step {step}: validation loss {val_loss:.4f}")
        self.log({"kind": "eval", "step": step, "val_loss": val_loss})

    def event(self, name: str, step: int, **fields) -> None:
        """An event of this run (shoal/observe/events.py), in metrics.jsonl if this worker logs."""
        self.log(event_record(name, step, **fields))

    def ranks(self, record: dict, straggler: tuple[str, float] | None) -> None:
        """A window's per-rank timing record (shoal/observe/ranks.py); a straggler is named on the
        progress line (or, under fault tolerance, in the worker's log) and as an event."""
        self.log(record)
        if straggler is None or not self.writes_metrics():
            return
        rank, slower = straggler
        text = (f"step {record['step']}: rank {rank} is a straggler: it reaches the gradient exchange after "
                f"{record['compute_max'] * 1000:.1f} ms of compute, {1 + slower:.1f}x the other ranks' median "
                f"({record['others_compute_median'] * 1000:.1f} ms)")
        self.progress.message(text)
        if self.progress.mode == "off":
            log.warning("%s", text)
        self.event("straggler", record["step"], rank=rank, slower=slower,
                   compute_seconds=record["compute_max"], others_compute_seconds=record["others_compute_median"])

    def log(self, record: dict) -> None:
        if self.writes_metrics():
            if self.metrics is None:  # this worker logs from now on: appended to what others wrote
                self.metrics = MetricsLog(self.run_dir, self.tensorboard, self.every, self.loggers())
                last = last_logged_step(self.metrics.path)
                for owed in self.recent:
                    if owed["step"] > last:
                        self.metrics.log(owed)
            self.metrics.log(record)
        if record["kind"] == "train":
            self.recent.append(record)

    def close(self) -> None:
        self.progress.close()
        if self.metrics is not None:
            self.metrics.close()
