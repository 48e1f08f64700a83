"""The fault-tolerant launcher: workers that come and go while training goes on.

torch.distributed.elastic's agent treats the workers of a host as one unit: any failure
stops and restarts all of them. Per-step fault tolerance needs the opposite, so this
supervisor starts each worker as its own process (shoal/launch/workers.py), restarts only the dead one (as
shoal/launch/restarts.py decides) and never touches the survivors. It hosts the c10d
TCPStore that holds membership and runs the `Coordinator` beside it, so membership
outlives any worker. Each worker is a whole replica without a default process group, or,
with `parallel.dp_shard = S > 1`, one of the S workers of a replica group that shard the
model together (see shoal/fault/elastic.py). A replica group lives and dies as one: when
one of its workers exits or is left out as hung, the supervisor kills the rest (they may be
stuck in a collective with it) and restarts all S, which rejoin as a new member.
"""

from __future__ import annotations

import json
import multiprocessing
import signal
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from shoal.config import USER_ERROR, Config, per_step_unsupported, replica_group_size
from shoal.fault import chaos as chaos_module
from shoal.runtime import protocol
from shoal.launch import workers
from shoal.launch.restarts import RestartPolicy
from shoal.launch.workers import worker_failure_text
from shoal.observe.events import append_event
from shoal.runtime.protocol import PREEMPTED_CODES

# torch is imported inside functions: `start_forkserver` should begin importing it in the
# forkserver before this process spends its own seconds doing the same.

def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


TICK = 0.01  # seconds between looks at the processes and the store: recovery latency is a few ticks


@dataclass
class Slot:
    index: int
    member: int
    """The replica this worker belongs to (shared by the workers of a replica group)."""
    proc: multiprocessing.process.BaseProcess
    log: Path | None
    incarnation: int = 0
    done: bool = False
    """The slot's worker finished training, or will not be restarted."""


class Supervisor:
    def __init__(self, cfg: Config, worker_args: list[str], run_dir: Path, *, chaos: str | None = None,
                 verbose: bool = False, extra_env: dict[str, str] | None = None, store_port: int = 0):
        import torch.distributed as dist
        from shoal.fault.membership import Coordinator
        from shoal.observe.fleet import FleetProgress
        self.cfg, self.worker_args, self.run_dir, self.verbose = cfg, worker_args, Path(run_dir), verbose
        self.log_dir = self.run_dir / "logs" / "workers"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.events = open(self.run_dir / "logs" / "fault_events.jsonl", "a")
        # It listens on every interface: workers of other hosts (shoal/launch/remote.py) join through it.
        self.store = dist.TCPStore("127.0.0.1", store_port, None, True, timeout=timedelta(seconds=30),
                                   wait_for_workers=False)
        # No worker owns the terminal (any may die): the launcher shows the job's progress.
        self.fleet = FleetProgress(self.store, cfg.train.steps, mode=cfg.log.progress, every=cfg.log.every,
                                   samples_per_step=cfg.train.batch_size)
        nproc = cfg.launch.nproc
        f = cfg.fault
        self.group_size = replica_group_size(cfg)
        # the coordinator counts replicas: whole workers, or replica groups of group_size workers
        self.coordinator = Coordinator(self.store, min_workers=-(-f.min_workers // self.group_size),
                                       max_workers=(f.max_workers or nproc) // self.group_size,
                                       settle=max(1.0, f.step_timeout / 2), initial=[],
                                       join_timeout=f.join_timeout, log=self.say,
                                       unit="worker" if self.group_size == 1 else "replica group",
                                       latest_checkpoint=lambda: _latest_step(cfg, self.run_dir))
        self.injections = chaos_module.parse(chaos) if chaos else []
        self.chaos_spec = chaos
        self.extra_env = extra_env or {}
        self.ctx = workers.start_forkserver()
        self.event("store", port=self.store.port)
        self.finished = False
        self.failures: list[str] = []
        self.restarts = RestartPolicy(cfg.fault.restarts_per_hour, cfg.fault.crash_loop)
        self.delayed: list[tuple[float, int, int]] = []  # (when, first slot, incarnation) of restarts backing off
        self.held: list[tuple[int, int, int]] = []  # (step, first slot, incarnation): chaos rejoin=, until that step
        self.slots: list[Slot] = []
        for first in range(0, nproc, self.group_size):
            self.slots += self._start_group(first, 0)
        self.coordinator.initial = sorted({slot.member for slot in self.slots})
        self.monkey = chaos_module.ChaosMonkey(self.injections, started=time.monotonic(), seed=cfg.train.seed)
        self.generations_seen = 0  # of coordinator.history, turned into regrouped/joined/left events
        self.broken_at: float | None = None  # wall time of the first failure since the last generation formed

    def record(self, event: str, **fields) -> None:
        """An event of the job in metrics.jsonl (shoal/observe/events.py), at the last committed step."""
        append_event(self.run_dir / "metrics.jsonl", event, self.fleet.last_step, **fields)

    def _record_generations(self) -> None:
        """Each generation the coordinator formed since the last look: regrouped, and who joined and left."""
        history = self.coordinator.history
        for index in range(self.generations_seen, len(history)):
            formed = history[index]
            before = set(history[index - 1]["members"]) if index else set()
            members = formed["members"]
            recovery = {"recovery_seconds": round(formed["t"] - self.broken_at, 3)} if self.broken_at and index else {}
            self.record("regrouped", time=formed["t"], gen=formed["gen"], members=members,
                        size=len(members) * self.group_size, **recovery)
            for member in sorted(set(members) - before):
                self.record("joined", time=formed["t"], member=member, gen=formed["gen"])
            for member in sorted(before - set(members)):
                self.record("left", time=formed["t"], member=member, gen=formed["gen"])
            self.broken_at = None
        self.generations_seen = len(history)

    def say(self, text: str) -> None:
        print(f"shoal: {text}", file=sys.stderr, flush=True)
        self.event("log", text=text)

    def event(self, kind: str, **fields) -> None:
        self.events.write(json.dumps({"t": time.time(), "event": kind, **fields}) + "\n")
        self.events.flush()

    def _start_group(self, first: int, incarnation: int) -> list[Slot]:
        """Start the replica whose first worker slot is `first`: one worker, or a replica group."""
        member = self.store.add(protocol.NEXT_MEMBER, 1) - 1  # shared with workers that join from elsewhere
        return [self._start(first + lane, lane, member, incarnation) for lane in range(self.group_size)]

    def _start(self, index: int, lane: int, member: int, incarnation: int) -> Slot:
        env = workers.worker_env(store=f"127.0.0.1:{self.store.port}", member=member, slot=index,
                                 incarnation=incarnation, local_workers=self.cfg.launch.nproc, extra=self.extra_env)
        if self.group_size > 1:  # its place in its replica group, which builds its own process group
            env.update(RANK=str(lane), WORLD_SIZE=str(self.group_size), LOCAL_RANK=str(lane),
                       LOCAL_WORLD_SIZE=str(self.group_size))
        if self.chaos_spec:
            env[protocol.CHAOS_ENV] = self.chaos_spec
        name = f"worker{member}.log" if self.group_size == 1 else f"worker{member}.lane{lane}.log"
        out = None if self.verbose else self.log_dir / name
        proc = workers.spawn(self.ctx, self.worker_args, env, out)
        self.event("start", slot=index, member=member, lane=lane, pid=proc.pid, incarnation=incarnation)
        return Slot(index, member, proc, out, incarnation)

    def run(self) -> int:
        """Supervise until training finishes (0), a worker reports a config error (2), the job
        cannot go on (1) or a stop signal ended it with a checkpoint (128 + the signal)."""
        received: list[int] = []
        previous = {signum: signal.signal(signum, lambda signum, _: received.append(signum))
                    for signum in protocol.STOP_SIGNALS}
        deadline = float("inf")
        try:
            while True:
                if received and not self.coordinator.preempting:
                    self.say(f"{signal.Signals(received[0]).name}: every worker stops after the step in flight; "
                             f"the first one saves a checkpoint")
                    self.coordinator.preempt(received[0])
                    self.record("preempted", signal=signal.Signals(received[0]).name)
                    deadline = time.monotonic() + self.cfg.fault.grace_seconds
                code = self._poll()
                if self.coordinator.preempting and (not self._live() or time.monotonic() > deadline):
                    return protocol.preempted_exit_code(self.coordinator.preempting)
                if code is not None:
                    return code
                self.coordinator.tick()
                self.fleet.poll()
                self._record_generations()
                self._kill_hung_groups()
                if self.coordinator.stopped:
                    self.failures.append(self.coordinator.stopped)
                    self._wait_exit(grace=10.0)
                    return 1
                live = {} if self.finished else self._live()  # no failures injected into a finishing job
                for action, slot, pid in self.monkey.tick(time.monotonic(), live):
                    self.say(f"chaos: {action} worker slot {slot} (pid {pid})")
                    self.event("chaos", action=action, slot=slot, pid=pid, member=self.slots[slot].member)
                time.sleep(TICK)  # several sources (process exits, store keys, the chaos clock): poll them
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self.fleet.close()
            self._kill_all()
            self.events.close()

    def _live(self) -> dict[int, int]:
        return {s.index: s.proc.pid for s in self.slots if s.proc.exitcode is None}

    def _group(self, slot: Slot) -> list[Slot]:
        """The slots of `slot`'s replica (itself alone when each worker is a whole replica)."""
        first = slot.index - slot.index % self.group_size
        return self.slots[first:first + self.group_size]

    def _stop_rest_of_group(self, slot: Slot) -> None:
        """Kill the other workers of a failed replica group: they may wait in a collective with
        the dead one, and the group restarts as a whole."""
        for peer in self._group(slot):
            if peer is slot or peer.done:
                continue
            killed = workers.kill(peer.proc)
            peer.proc.join()
            peer.done = True
            # with_group: stopped here because of its group, not by a failure of its own
            self.event("exit", slot=peer.index, member=peer.member, code=peer.proc.exitcode,
                       **({"with_group": True} if killed else {}))

    def _kill_hung_groups(self) -> None:
        """A replica group the coordinator left out as hung is killed, and so restarted."""
        left_out = self.coordinator.take_left_out()
        if self.group_size == 1:
            return  # a whole-replica worker left out as hung rejoins by itself when it wakes
        for member in left_out:
            for slot in self.slots:
                if slot.member == member and not slot.done and slot.proc.exitcode is None:
                    self.say(f"replica group {member} was left out as hung; restarting it")
                    workers.kill(slot.proc)  # _poll restarts the group
                    break

    def _poll(self) -> int | None:
        now = time.monotonic()
        for when, first, incarnation in [d for d in self.delayed if d[0] <= now]:
            self.delayed.remove((when, first, incarnation))
            if not self.finished:
                self.slots[first:first + self.group_size] = self._start_group(first, incarnation)
        # a held replacement starts when the job's progress reaches its step, or at once when no worker is left
        anyone = any(not slot.done for slot in self.slots)
        for until, first, incarnation in [h for h in self.held if h[0] <= self.fleet.last_step or not anyone]:
            self.held.remove((until, first, incarnation))
            if not self.finished:
                self.say(f"chaos: the job is at step {self.fleet.last_step}; starting the held replacement of "
                         f"slot {first}")
                self.slots[first:first + self.group_size] = self._start_group(first, incarnation)
        for slot in self.slots:
            if slot.done or slot.proc.exitcode is None:
                continue
            code = slot.proc.exitcode
            self.coordinator.mark_exited(slot.member)
            self.event("exit", slot=slot.index, member=slot.member, code=code)
            if code != 0 and code not in PREEMPTED_CODES:
                cause = {"signal": signal_name(-code)} if code < 0 else {"code": code}
                self.record("died", member=slot.member, slot=slot.index, pid=slot.proc.pid, **cause)
                self.broken_at = self.broken_at or time.time()
            if code == 0:
                if not self.finished:
                    self.store.set(protocol.FINISHED, "1")  # other hosts' workers still waiting to join stop
                slot.done = self.finished = True
                continue
            self._stop_rest_of_group(slot)
            slot.done = True
            what = f"worker {slot.member} (slot {slot.index})" if self.group_size == 1 else \
                f"worker slot {slot.index} of replica group {slot.member}"
            if code == USER_ERROR:  # a user mistake the worker found: its own one-line error
                self.failures.append(worker_failure_text(slot.log))
                return USER_ERROR
            if self.finished:
                continue
            if code in PREEMPTED_CODES:  # a stop signal: the worker left cleanly, or the job stops
                if not self.coordinator.preempting:
                    self.say(f"{what} left after a stop signal ({code - 128}); not restarted")
                continue
            decision = self.restarts.after_exit(slot.index - slot.index % self.group_size, code,
                                                self._committed(slot.member), now)
            if not decision.restart:
                self.say(f"{what} exited with {code}; {decision.reason}: not restarted")
                self.failures.append(f"{what} {decision.reason}; its last output:\n{worker_failure_text(slot.log)}")
                if code > 0:  # a crash loop: training would only lose the slot again and again
                    return 1
                continue
            first = slot.index - slot.index % self.group_size
            until = chaos_module.take_hold(self.store, slot.index) if self.injections else 0
            self.say(f"{what} exited with {code}; starting a replacement"
                     + ("" if self.group_size == 1 else f" group of {self.group_size} workers")
                     + (f" in {decision.delay:.0f}s" if decision.delay else "")
                     + (f" once the job is at step {until} (chaos rejoin=)" if until else ""))
            if until:
                self.held.append((until, first, slot.incarnation + 1))
            else:
                self.delayed.append((now + decision.delay, first, slot.incarnation + 1))
            self.record("replaced", member=slot.member, slot=slot.index, delay=round(decision.delay, 3))
        running = [s for s in self.slots if not s.done]
        if self.finished:
            # Training is complete: workers still waiting to join have nothing left to do.
            for s in running:
                if s.member not in self.coordinator.members:
                    s.proc.kill()
                    s.proc.join()
                    s.done = True
                    self.event("retire", slot=s.index, member=s.member)
            running = [s for s in running if not s.done]
            return 0 if not running else None
        alive = len(running) + self.group_size * (len(self.delayed) + len(self.held))  # one backing off still counts
        if not alive:
            return 1
        if alive < self.cfg.fault.min_workers:
            self.failures.append(f"only {alive} worker(s) left, below fault.min_workers = "
                                 f"{self.cfg.fault.min_workers}")
            return 1
        return None

    def _committed(self, member: int) -> bool:
        """Whether `member` took part in a committed step (it says so once, through the store)."""
        return self.store.check([protocol.committed(member)])

    def _wait_exit(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        for slot in self.slots:
            slot.proc.join(timeout=max(0.1, deadline - time.monotonic()))

    def _kill_all(self) -> None:
        for slot in self.slots:
            workers.kill(slot.proc)


def _latest_step(cfg: Config, run_dir: Path) -> int:
    """The step of the job's latest complete checkpoint, or -1."""
    from shoal.runtime.checkpoint import checkpoint_steps
    from shoal.observe.rundir import checkpoint_folder
    steps = checkpoint_steps(checkpoint_folder(cfg, run_dir))
    return steps[-1][0] if steps else -1


def supervise(cfg: Config, worker_args: list[str], run_dir: Path, *, chaos: str | None = None,
              verbose: bool = False, extra_env: dict[str, str] | None = None,
              store_port: int = 0) -> tuple[int, list[str]]:
    """Run a fault-tolerant job on this host; returns (exit code, failure messages)."""
    supervisor = Supervisor(cfg, worker_args, run_dir, chaos=chaos, verbose=verbose, extra_env=extra_env,
                            store_port=store_port)
    code = supervisor.run()
    return code, supervisor.failures


def check_fault_tolerant(cfg: Config, nproc: int, chaos: str | None) -> bool:
    """Check [fault] and the chaos spec before anything starts; True when training will run
    with per-step fault tolerance (False: restart-from-checkpoint, or fault tolerance off)."""
    from shoal.config import ConfigError
    from shoal.fault.membership import validate_fault
    if chaos and not cfg.fault.enabled:
        raise ConfigError("--chaos needs fault.enabled = true (otherwise the first failure stops the job)")
    if chaos:
        try:
            chaos_module.parse(chaos)
        except chaos_module.ChaosError as err:
            raise ConfigError(str(err)) from None
    if not cfg.fault.enabled:
        return False
    validate_fault(cfg, nproc, group_size=1 if per_step_unsupported(cfg) else replica_group_size(cfg))
    if chaos and per_step_unsupported(cfg):
        raise ConfigError(f"--chaos needs per-step fault tolerance, but {per_step_unsupported(cfg)}")
    return not per_step_unsupported(cfg)


def launch_fault_tolerant(cfg: Config, worker_args: list[str], run_dir: Path, *, chaos: str | None,
                          verbose: bool, rendezvous=None) -> int | None:
    """Run with fault.enabled: per-step recovery when the layout allows, else return None after
    saying so, for the caller to launch with elastic restarts from the last checkpoint.

    With `rendezvous` (`shoal launch`, node rank 0) the membership store listens on its port,
    where the other hosts' launchers (shoal/launch/remote.py) send their workers."""
    reason = per_step_unsupported(cfg)
    if rendezvous is not None and not reason and replica_group_size(cfg) > 1:
        reason = "replica groups across hosts are not supported by per-step fault tolerance yet"
    if reason and chaos:
        from shoal.config import ConfigError
        raise ConfigError(f"--chaos needs per-step fault tolerance, but {reason}")
    if reason:
        print(f"shoal: fault.enabled: {reason}; falling back to restarting every worker from the last "
              f"checkpoint (up to fault.max_restarts = {cfg.fault.max_restarts} times)", file=sys.stderr)
        cfg.launch.max_restarts = cfg.fault.max_restarts  # the elastic agent's restarts serve the fallback
        return None
    store_port = int(rendezvous.endpoint.rpartition(":")[2]) if rendezvous is not None else 0
    if rendezvous is not None:
        print(f"shoal: fault-tolerant job: other hosts join with `shoal launch --node-rank 1 --rdzv "
              f"{rendezvous.endpoint} ...` (up to fault.max_workers = {cfg.fault.max_workers} workers)",
              file=sys.stderr)
    code, failures = supervise(cfg, worker_args, run_dir, chaos=chaos, verbose=verbose, store_port=store_port)
    for failure in failures if code else []:  # a job that succeeded has nothing to explain
        print(failure if failure.startswith("shoal: error:") else f"shoal: {failure}", file=sys.stderr)
    if code == 0:
        print(f"shoal: run directory {run_dir}", file=sys.stderr)
    return code
