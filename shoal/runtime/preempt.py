"""Preemption: stop at the next step boundary with a checkpoint, then exit.

Kubernetes, SLURM and spot reclaim send SIGTERM (SLURM's `--signal=B:USR1@60` sends SIGUSR1 ahead
of time; Ctrl-C is SIGINT). A worker that receives one only records it here; the Trainer asks
`requested()` at each step boundary and the ranks agree on it inside a collective they run anyway,
so every rank stops after the same step, writes the same checkpoint and exits with
`protocol.preempted_exit_code(signal)`: 128 + the signal's number, what a process ended by that
signal returns.

The launcher forwards the signal it receives to its workers (the elastic agent does it for
`shoal run`/`shoal launch`, giving them `fault.grace_seconds` before SIGKILL), so it does not
matter whether the signal reaches the launcher, every process, or one worker.
"""

from __future__ import annotations

import signal
import threading

from shoal.runtime.protocol import STOP_SIGNALS

_received = 0


class Preempted(Exception):
    """Training stopped at a step boundary because a stop signal arrived; a checkpoint is saved."""

    def __init__(self, signum: int, step: int, *, save: bool = True):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}")
        self.signum, self.step = signum, step
        self.save = save
        """False for a fault-tolerant worker that left alone: the others go on and save as usual."""


def _record(signum: int, frame) -> None:
    global _received
    _received = _received or signum


def install() -> None:
    """Record the stop signals instead of dying at once (main thread only: Python's rule)."""
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            signal.signal(signum, _record)


def requested() -> int:
    """The first stop signal this process received, or 0."""
    return _received

