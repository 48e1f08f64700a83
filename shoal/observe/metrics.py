"""Metrics of a run: one JSON object per line in metrics.jsonl, mirrored to TensorBoard."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


class MetricsLog:
    """Appends records to `<run_dir>/metrics.jsonl`; only the logging rank creates one.

    Every record goes to the JSONL file; training records go to TensorBoard every
    `tensorboard_every` steps, as its writer costs about a millisecond per record on the
    logging rank, which every other rank then waits for at the next all-reduce.
    """

    def __init__(self, run_dir: Path, tensorboard: bool = True, tensorboard_every: int = 1,
                 loggers: list | None = None):
        self.tensorboard_every = tensorboard_every
        self.loggers = list(loggers or [])  # MLflow, W&B (shoal/observe/loggers.py): sampled as TensorBoard is
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self.path = Path(run_dir) / "metrics.jsonl"
        self.file = self.path.open("a", buffering=1)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        record = {"time": round(time.time(), 3), **record}
        self.file.write(json.dumps(record) + "\n")
        sampled = record.get("kind", "train") != "train" or record.get("step", 0) % self.tensorboard_every == 0
        if sampled:
            for logger in self.loggers:
                logger.log(record)
        if self.writer is not None and record.get("kind") == "event":  # a mark, not a curve: text
            self.writer.add_text("events", json.dumps(record), record.get("step", 0))
            return
        if self.writer is not None and "step" in record and sampled:
            self._scalars(record)

    def _scalars(self, record: dict[str, Any]) -> None:
        """The record's numbers as one TensorBoard event (one summary of many values), the same
        curves as an `add_scalar` per number at about a tenth of the cost: the event framing and
        its checksums, computed in Python by TensorBoard's writer, are paid once per record."""
        from tensorboard.compat.proto.summary_pb2 import Summary
        kind = record.get("kind", "train")
        values = [Summary.Value(tag=f"{kind}/{key}", simple_value=float(value)) for key, value in record.items()
                  if key not in ("step", "time", "kind") and isinstance(value, (int, float))]
        if values:
            self.writer.file_writer.add_summary(Summary(value=values), record["step"])

    def close(self) -> None:
        self.file.close()
        for logger in self.loggers:
            logger.close()
        if self.writer is not None:
            self.writer.close()


REPEATED_KINDS = ("train", "eval", "ranks", "selfplay")
"""Records a resumed run writes again for the steps it repeats (events stay: they happened)."""


def drop_records_after(run_dir: Path, step: int) -> int:
    """Remove the train, eval and per-rank records of steps after `step` from metrics.jsonl: a
    run resumed from the checkpoint of `step` repeats them, and each step is logged once. The
    file is rewritten beside and renamed over, so a crash leaves the old file or the new one.
    Returns how many records were dropped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the kill: nothing of it can be kept
            dropped += 1
            continue
        if record.get("kind", "train") in REPEATED_KINDS and record.get("step", -1) > step:
            dropped += 1
        else:
            kept.append(line + "\n")
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
    return dropped


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a Shoal run directory?")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{number} is not valid JSON") from None
    return records
