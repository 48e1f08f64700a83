"""The self-play processes beside the learner: actors that play games with the newest weights,
and one evaluator that measures each evaluated weight version (shoal/selfplay/, docs/selfplay.md).

The learner is the launcher's ordinary workers (`launch.nproc` ranks of `shoal.worker`, under
torch's elastic agent, restarted from their checkpoint under `fault.enabled`). The actors are not
part of that process group: they only read weight files and write game files in the run
directory, so one can die and be replaced without the learner noticing. This pool starts them
the way the fault-tolerant launcher starts its workers (forked from the same forkserver,
shoal/launch/workers.py) and decides about a dead one with the same `RestartPolicy`
(shoal/launch/restarts.py): an actor that wrote a batch of games counts as having committed, one
that crashes before its first batch `fault.crash_loop` times in a row stops the run. Without
`fault.enabled` a dead actor is not replaced and the run stops, as a dead worker stops it.

The pool watches its processes from a thread of the launcher while the elastic agent owns the
main thread; a failure it cannot repair is handed to the learner as the file
`selfplay/failed` (shoal/selfplay/transport.py), which the learner turns into its exit.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from shoal.config import Config
from shoal.runtime.protocol import PREEMPTED_CODES
from shoal.launch import workers
from shoal.launch.restarts import RestartPolicy
from shoal.observe.events import append_event

TICK = 0.05  # seconds between looks at the processes; a replacement starts within a few ticks


@dataclass
class Member:
    role: str
    slot: int
    proc: object
    log: Path | None
    incarnation: int = 0
    done: bool = False


class ActorPool:
    """Starts `selfplay.actors` actors (and an evaluator when `selfplay.eval_every` > 0) and keeps
    them running until `stop()`."""

    def __init__(self, cfg: Config, worker_args: list[str], run_dir: Path, *, verbose: bool = False):
        from shoal.selfplay import transport
        self.cfg, self.worker_args, self.run_dir, self.verbose = cfg, worker_args, Path(run_dir), verbose
        self.transport = transport
        self.replace = cfg.fault.enabled
        self.restarts = RestartPolicy(cfg.fault.restarts_per_hour, cfg.fault.crash_loop)
        self.log_dir = self.run_dir / "logs" / "actors"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.processes = cfg.launch.nproc + cfg.selfplay.actors + (1 if cfg.selfplay.eval_every else 0)
        self.ctx = workers.start_forkserver()
        self.members: list[Member] = []
        self.delayed: list[tuple[float, str, int, int]] = []  # (when, role, slot, incarnation) backing off
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="selfplay-actors", daemon=True)

    def start(self) -> None:
        self.transport.clear_marks(self.run_dir)  # a resumed run is neither finished nor failed
        for slot in range(self.cfg.selfplay.actors):
            self.members.append(self._spawn("actor", slot, self._first_incarnation("actor", slot)))
        if self.cfg.selfplay.eval_every:
            self.members.append(self._spawn("evaluator", 0, self._first_incarnation("evaluator", 0)))
        self.thread.start()

    def _first_incarnation(self, role: str, slot: int) -> int:
        """After `--resume` the slots continue their count: a batch id is never written twice."""
        return self.transport.next_incarnation(self.run_dir, role, slot)

    def _spawn(self, role: str, slot: int, incarnation: int) -> Member:
        from shoal.runtime.protocol import LOCAL_WORKERS_ENV
        env = {name: value for name, value in os.environ.items() if name not in workers.RENDEZVOUS_VARIABLES}
        t = self.transport
        env.update({t.ROLE_ENV: role, t.SLOT_ENV: str(slot), t.INCARNATION_ENV: str(incarnation),
                    LOCAL_WORKERS_ENV: str(self.processes)})
        log = None if self.verbose else self.log_dir / f"{role}{slot}.log"
        proc = workers.spawn(self.ctx, self.worker_args, env, log)
        return Member(role, slot, proc, log, incarnation)

    def _record(self, event: str, **fields) -> None:
        append_event(self.run_dir / "metrics.jsonl", event, self.transport.latest_version(self.run_dir), **fields)

    def _say(self, text: str) -> None:
        print(f"shoal: {text}", file=sys.stderr, flush=True)

    def _watch(self) -> None:
        while not self.stopping.is_set():
            now = time.monotonic()
            for due in [d for d in self.delayed if d[0] <= now]:
                self.delayed.remove(due)
                _, role, slot, incarnation = due
                self.members.append(self._spawn(role, slot, incarnation))
            for member in self.members:
                if not member.done and member.proc.exitcode is not None:
                    member.done = True
                    if not self.stopping.is_set():
                        self._exited(member, member.proc.exitcode, now)
            self.stopping.wait(TICK)

    def _exited(self, member: Member, code: int, now: float) -> None:
        name = f"{member.role} {member.slot}"
        if code == 0:  # the learner finished: the actor saw the marker and left
            return
        if code in PREEMPTED_CODES:  # a stop signal (Ctrl-C reaches every process): the run is stopping
            self._say(f"{name} left after a stop signal ({code - 128}); not replaced")
            return
        cause = {"signal": signal.Signals(-code).name} if code < 0 else {"code": code}
        self._record("died", role=member.role, slot=member.slot, pid=member.proc.pid, **cause)
        if self.transport.finished(self.run_dir):
            return
        if not self.replace:
            self._fail(f"{name} exited with {code} and fault.enabled = false: the run stops "
                       f"(set fault.enabled = true to replace dead actors); its log: {member.log}")
            return
        committed = self.transport.slot_has_batches(self.run_dir, member.role, member.slot, member.incarnation)
        decision = self.restarts.after_exit(self._slot_key(member), code, committed, now)
        if not decision.restart:
            self._fail(f"{name} exited with {code}; {decision.reason}: not restarted; its last output:\n"
                       f"{workers.worker_failure_text(member.log)}")
            return
        self._say(f"{name} exited with {code}; starting a replacement"
                  + (f" in {decision.delay:.0f}s" if decision.delay else ""))
        self._record("replaced", role=member.role, slot=member.slot, delay=round(decision.delay, 3))
        self.delayed.append((now + decision.delay, member.role, member.slot, member.incarnation + 1))

    def _slot_key(self, member: Member) -> int:
        return member.slot if member.role == "actor" else -1 - member.slot

    def _fail(self, text: str) -> None:
        self._say(text)
        self.transport.mark_failed(self.run_dir, text)

    def stop(self) -> None:
        """End the pool: actors are killed (an unfinished batch is never published); after a learner
        that finished, the evaluator first evaluates the last version."""
        evaluators = [m for m in self.members if m.role == "evaluator" and m.proc.exitcode is None]
        if self.transport.finished(self.run_dir) and evaluators:
            self._say("waiting for the evaluator's evaluation of the last weight version")
            for member in evaluators:
                member.proc.join()
        self.stopping.set()
        self.thread.join()
        for member in self.members:
            workers.kill(member.proc)


def start_actors(cfg: Config, worker_args: list[str], run_dir: Path, *, nnodes: int, verbose: bool) -> ActorPool:
    """Start a self-play run's actors and evaluator on this host, before its learner ranks."""
    from shoal.config import ConfigError
    if nnodes > 1:
        raise ConfigError("selfplay: a self-play run lives on one host for now (its actors and learner share the "
                          "run directory); run `shoal run` without --nnodes")
    pool = ActorPool(cfg, worker_args, run_dir, verbose=verbose)
    pool.start()
    return pool
