"""Progress of training on the logging rank: a live bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total_steps: int, start_step: int = 0, *, mode: str = "auto", every: int = 10,
                 unit: str = "samples"):
        if mode == "auto":
            mode = "bar" if sys.stdout.isatty() else "plain"
        self.mode, self.every, self.unit, self.total = mode, every, unit, total_steps
        self.start_time, self.start_step = time.perf_counter(), start_step
        self.bar = None
        self.printed = start_step
        if mode == "bar":
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, \
                TimeRemainingColumn
            self.bar = RichProgress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                    TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]}"),
                                    TextColumn("eta"), TimeRemainingColumn())
            self.task = self.bar.add_task("train", total=total_steps, completed=start_step, loss="-", rate="-")
            self.bar.start()

    def update(self, step: int, loss: float, rate: float) -> None:
        """`step` steps are done; `rate` is units per second."""
        rate_text = f"{rate:,.0f} {self.unit}/s"
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=f"{loss:.4f}", rate=rate_text)
        elif self.mode == "plain" and (step // self.every > self.printed // self.every or step == self.total):
            self.printed = step  # a caller that skips steps (the fault-tolerant launcher) still prints
            done = step - self.start_step
            elapsed = time.perf_counter() - self.start_time
            eta = elapsed / done * (self.total - step) if done else 0.0
            print(f"step {step}/{self.total}  loss {loss:.4f}  {rate_text}  eta {eta:.0f}s", flush=True)

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(text)
        elif self.mode != "off":
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
