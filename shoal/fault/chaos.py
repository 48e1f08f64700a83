"""Failure injection with real signals: `shoal run --chaos SPEC` and the fault tests.

A spec is one or more injections separated by ';', each a comma-separated list of
key=value items:

    kill=random,every=15s            SIGKILL a random live worker every 15 s (from the launcher)
    hang=1,every=20s,for=10s         SIGSTOP worker slot 1 every 20 s, SIGCONT it 10 s later
    slow=random,every=5s,for=500ms   pause a worker briefly (a straggler, shorter than a step timeout)
    kill=2,step=5,at=during          worker slot 2 SIGKILLs itself at step 5, inside the all-reduce
    kill=source,step=3,at=transfer   the worker sending state to a joiner dies mid-transfer
    kill=0,step=40,size=3            slot 0 dies at the first step >= 40 with 3 workers in the group
    kill=1,step=20,rejoin=3          slot 1 dies at step 20; its replacement starts only once the
                                     others have committed steps 20-22 (a replacement slow to come)

Injections with `every` are driven by the launcher's clock (`ChaosMonkey`); those with
`step` fire inside the worker at a named point of the step (`ChaosPoints`), so a test can
place a failure before, during or after the gradient all-reduce exactly. A slot is a
launch position (0..nproc-1); a restarted worker keeps its slot. Each step injection fires
once per job (claimed through the store), so a replacement never repeats its predecessor's,
and only after every injection with a smaller step has fired in an earlier generation, so a
scenario plays in order, one recovery at a time (injections with the same step fire
together: two at once; one whose partner fired first still fires at its next point, even if
the group has shrunk below its `size=` meanwhile).
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable

from shoal.config import rank_seed
from shoal.runtime import protocol

ACTIONS = ("kill", "hang", "slow")
POINTS = ("before", "during", "after", "transfer")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m)?$")


class ChaosError(ValueError):
    """A chaos spec that does not parse; the message names the bad part."""


def parse_duration(text: str, where: str) -> float:
    """'15s', '500ms', '2m' or a bare number of seconds -> seconds."""
    match = _DURATION.match(text.strip())
    if not match:
        raise ChaosError(f"--chaos: {where}={text!r} is not a duration such as 15s, 500ms or 2m")
    value, unit = float(match.group(1)), match.group(2) or "s"
    return value * {"ms": 1e-3, "s": 1.0, "m": 60.0}[unit]


@dataclass(frozen=True, kw_only=True)
class Injection:
    action: str
    """kill (SIGKILL), hang (SIGSTOP for `duration`) or slow (a short pause)."""
    target: str
    """'random', 'source' (the state sender, with at=transfer) or a worker slot number."""
    every: float = 0.0
    """Seconds between launcher-driven injections; 0 for a step injection."""
    duration: float = 0.0
    """How long hang/slow keep the worker paused."""
    start: float = 0.0
    """Seconds before the first launcher-driven injection (default: `every`)."""
    count: int = 0
    """Most injections of this kind. 0 means unlimited (launcher) or once (step)."""
    step: int = -1
    """Step at which a worker-side injection fires; -1 for launcher-driven ones."""
    at: str = "during"
    """Point of the step: before, during or after the all-reduce, or transfer (sending state)."""
    size: int = 0
    """A step injection waits for a step with at least this many workers in the group."""
    rejoin: int = 0
    """A step kill: the launcher starts the replacement once the job has committed this many steps
    past the one it died in (its step included); 0 starts it at once."""


def parse(spec: str) -> list[Injection]:
    """Parse a chaos spec; raises ChaosError with the offending item."""
    injections = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        items: dict[str, str] = {}
        for item in filter(None, (i.strip() for i in part.split(","))):
            key, sep, value = item.partition("=")
            if not sep or not value:
                raise ChaosError(f"--chaos: '{item}' must look like key=value (in '{part}')")
            if key in items:
                raise ChaosError(f"--chaos: '{key}' given twice in '{part}'")
            items[key.strip()] = value.strip()
        actions = [a for a in ACTIONS if a in items]
        if len(actions) != 1:
            raise ChaosError(f"--chaos: '{part}' needs exactly one of {', '.join(ACTIONS)} (e.g. kill=random)")
        action = actions[0]
        target = items.pop(action)
        if target not in ("random", "source") and not target.isdigit():
            raise ChaosError(f"--chaos: {action}={target!r} must be 'random', 'source' or a worker slot number")
        unknown = set(items) - {"every", "for", "start", "count", "step", "at", "size", "rejoin"}
        if unknown:
            raise ChaosError(f"--chaos: unknown key(s) {', '.join(sorted(unknown))} in '{part}'; "
                             f"allowed: every, for, start, count, step, at, size, rejoin")
        if "rejoin" in items and (action != "kill" or "every" in items):
            raise ChaosError(f"--chaos: rejoin= applies to step kills (kill=N,step=S), not to '{part}'")
        if ("every" in items) == ("step" in items):
            raise ChaosError(f"--chaos: '{part}' needs either every=DURATION (launcher clock) or step=N (in the worker)")
        duration = parse_duration(items["for"], "for") if "for" in items else (10.0 if action == "hang" else 0.5)
        if action == "kill" and "for" in items:
            raise ChaosError(f"--chaos: 'for' applies to hang and slow, not kill (in '{part}')")
        count = items.get("count", "0")
        if not count.isdigit():
            raise ChaosError(f"--chaos: count={count!r} must be a whole number")
        if "every" in items:
            if "at" in items or target == "source":
                raise ChaosError(f"--chaos: at= and source apply to step injections, not every= (in '{part}')")
            every = parse_duration(items["every"], "every")
            if every <= 0:
                raise ChaosError("--chaos: every must be above 0")
            start = parse_duration(items["start"], "start") if "start" in items else every
            injections.append(Injection(action=action, target=target, every=every, duration=duration,
                                        start=start, count=int(count)))
        else:
            if not items["step"].isdigit():
                raise ChaosError(f"--chaos: step={items['step']!r} must be a step number")
            at = items.get("at", "during")
            if at not in POINTS:
                raise ChaosError(f"--chaos: at={at!r} is not one of {', '.join(POINTS)}")
            if (target == "source") != (at == "transfer"):
                raise ChaosError("--chaos: at=transfer goes with the target 'source' (the worker sending state)")
            size, rejoin = items.get("size", "0"), items.get("rejoin", "0")
            if not size.isdigit():
                raise ChaosError(f"--chaos: size={size!r} must be a number of workers")
            if not rejoin.isdigit():
                raise ChaosError(f"--chaos: rejoin={rejoin!r} must be a number of steps")
            injections.append(Injection(action=action, target=target, duration=duration, step=int(items["step"]),
                                        at=at, size=int(size), rejoin=int(rejoin)))
    if not injections:
        raise ChaosError("--chaos: empty spec; e.g. --chaos kill=random,every=15s")
    return injections


def claim(store, injection: int, gen: int) -> bool:
    """Record in the job's store that step injection `injection` fires now, in generation `gen`;
    False if it already fired (each fires once per job, whoever holds its slot now)."""
    if store.add(protocol.chaos_claimed(injection), 1) != 1:
        return False
    store.set(protocol.chaos_fired(injection), str(gen))
    return True


def hold(store, slot: int, until: int) -> None:
    """Ask the launcher to start the replacement of worker slot `slot` only once the job's progress
    reaches step `until` (set by the worker just before it kills itself)."""
    store.set(protocol.chaos_hold(slot), str(until))


def take_hold(store, slot: int) -> int:
    """The step the replacement of `slot` waits for (0: none); the request is consumed."""
    key = protocol.chaos_hold(slot)
    if not store.check([key]):
        return 0
    until = int(store.get(key))
    store.delete_key(key)
    return until


def fired_in(store, injection: int) -> int:
    """The generation in which step injection `injection` fired, or -1."""
    key = protocol.chaos_fired(injection)
    return int(store.get(key)) if store.check([key]) else -1


def pause(pid: int, seconds: float) -> None:
    """SIGSTOP `pid` now and SIGCONT it after `seconds`, from a helper process that outlives the
    caller's own pause (a stopped process cannot wake itself)."""
    # The paused worker may be killed meanwhile (its group restarted): then there is nothing to wake.
    wake = (f"import os, signal, time\ntime.sleep({seconds})\n"
            f"try:\n    os.kill({pid}, signal.SIGCONT)\nexcept ProcessLookupError:\n    pass\n")
    subprocess.Popen([sys.executable, "-c", wake], start_new_session=True)
    os.kill(pid, signal.SIGSTOP)


class ChaosPoints:
    """Step injections inside one worker: `fire(point, step)` at each named point of a step."""

    def __init__(self, injections: list[Injection], *, slot: int, nproc: int, claim: Callable[[int, int], bool],
                 fired_in: Callable[[int], int], hold: Callable[[int], None] = lambda until: None, seed: int = 0):
        self.slot, self.nproc, self.claim, self.fired_in, self.seed = slot, nproc, claim, fired_in, seed
        self.hold = hold
        self.pending = [(k, i) for k, i in enumerate(injections) if i.step >= 0]
        self.earlier = {k: [j for j, other in self.pending if other.step < i.step] for k, i in self.pending}
        self.together = {k: [j for j, other in self.pending if other.step == i.step and j != k]
                         for k, i in self.pending}

    def fire(self, point: str, step: int, *, size: int, gen: int, is_source: bool = False) -> None:
        """Fire the injections due at `point` of `step` in generation `gen` of `size` workers.
        `claim(k, gen)` is true for the first caller only, so each injection fires once per job;
        `fired_in(k)` is the generation injection k fired in (-1: not yet)."""
        for k, inj in list(self.pending):
            if inj.at != point or step < inj.step:
                continue
            # `size=` holds for the first of injections at one step; one whose partner already
            # fired fires at its own next point even in the smaller group the partner's death
            # left (a worker slower to reach its point than the survivors to regroup)
            if size < inj.size and not any(self.fired_in(j) >= 0 for j in self.together[k]):
                continue
            if inj.target == "source":
                hit = is_source
            elif inj.target == "random":
                hit = random.Random(rank_seed(self.seed, inj.step)).randrange(self.nproc) == self.slot
            else:
                hit = int(inj.target) == self.slot
            if not hit or not all(0 <= self.fired_in(j) < gen for j in self.earlier[k]):
                continue
            self.pending.remove((k, inj))
            if not self.claim(k, gen):
                continue
            if inj.action == "kill":
                if inj.rejoin:  # step `step` is not committed by this worker: count from it
                    self.hold(step + inj.rejoin)
                os.kill(os.getpid(), signal.SIGKILL)
            else:
                pause(os.getpid(), inj.duration)


class ChaosMonkey:
    """Launcher-driven injections on the clock: `tick(now, live)` signals workers that are due."""

    def __init__(self, injections: list[Injection], *, started: float, seed: int = 0):
        self.timed = [i for i in injections if i.every > 0]
        self.next_at = [started + i.start for i in self.timed]
        self.done = [0] * len(self.timed)
        self.rng = random.Random(seed)

    def tick(self, now: float, live: dict[int, int]) -> list[tuple[str, int, int]]:
        """Fire what is due on `live` ({slot: pid}); returns (action, slot, pid) of each injection."""
        fired = []
        for k, inj in enumerate(self.timed):
            if now < self.next_at[k] or (inj.count and self.done[k] >= inj.count) or not live:
                continue
            self.next_at[k] = now + inj.every
            slot = self.rng.choice(sorted(live)) if inj.target == "random" else int(inj.target)
            if slot not in live:
                continue  # that worker is down right now; try again next period
            pid = live[slot]
            if inj.action == "kill":
                os.kill(pid, signal.SIGKILL)
            else:
                pause(pid, inj.duration)
            self.done[k] += 1
            fired.append((inj.action, slot, pid))
        return fired
