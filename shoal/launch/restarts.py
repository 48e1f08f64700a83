"""When a fault-tolerant launcher replaces a dead worker, and when it gives up.

Machines that are preempted for a week die hundreds of times: a worker that dies after it
committed steps is replaced every time, with at most `fault.restarts_per_hour` replacements of
one slot within any hour (0: no limit), as Kubernetes and Ray restart a pod or actor that
ran. A worker that *crashes* (exits with an error) before it committed any step is a crash
loop, as Kubernetes' CrashLoopBackOff: its slot is restarted after 1 s, 2 s, 4 s, ... and
after `fault.crash_loop` such crashes in a row the job stops, naming the slot and showing its
traceback. A kill (a negative exit code: a signal) is never counted as a crash.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

BACKOFF_SECONDS = 1.0  # the first wait after a crash; it doubles with each crash in a row
HOUR = 3600.0


@dataclass
class SlotHistory:
    crashes: int = 0
    """Crashes in a row before any committed step."""
    restarts: deque = field(default_factory=deque)
    """When the slot was restarted after a worker that had committed steps (the last hour's)."""


@dataclass(frozen=True)
class Decision:
    restart: bool
    delay: float = 0.0
    """Seconds to wait before the restart (backoff after a crash)."""
    reason: str = ""
    """Why the slot is not restarted (restart False)."""


@dataclass
class RestartPolicy:
    restarts_per_hour: int
    crash_loop: int
    slots: dict[int, SlotHistory] = field(default_factory=dict)

    def after_exit(self, slot: int, code: int, committed: bool, now: float) -> Decision:
        """What to do with `slot` whose worker exited with `code`; `committed` says whether it
        (or an earlier worker of the slot) took part in a committed step since its last crash."""
        history = self.slots.setdefault(slot, SlotHistory())
        if code > 0 and not committed:
            history.crashes += 1
            if history.crashes >= self.crash_loop:
                return Decision(False, reason=f"crashed {history.crashes} times in a row before committing a step "
                                              f"(fault.crash_loop = {self.crash_loop})")
            return Decision(True, delay=BACKOFF_SECONDS * 2 ** (history.crashes - 1))
        if committed:
            history.crashes = 0
        while history.restarts and now - history.restarts[0] >= HOUR:
            history.restarts.popleft()
        if self.restarts_per_hour and len(history.restarts) >= self.restarts_per_hour:
            return Decision(False, reason=f"was restarted {len(history.restarts)} times within the last hour "
                                          f"(fault.restarts_per_hour = {self.restarts_per_hour})")
        history.restarts.append(now)
        return Decision(True)
