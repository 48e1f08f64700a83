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

Other hosts add actors with `shoal launch --nnodes N --node-rank K --rdzv HOST:PORT` (K > 0):
node rank 0's launcher hosts a c10d TCPStore on PORT and relays weights out and games in
through it (shoal/selfplay/relay.py); a host K runs actors only, against a run directory of its
own, and leaves when the job ends. Its learner stays on node rank 0.
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


def say(text: str) -> None:
    print(f"shoal: {text}", file=sys.stderr, flush=True)


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

    def __init__(self, cfg: Config, worker_args: list[str], run_dir: Path, *, verbose: bool = False,
                 with_learner: bool = True, relay=None):
        from shoal.selfplay import transport
        self.cfg, self.worker_args, self.run_dir, self.verbose = cfg, worker_args, Path(run_dir), verbose
        self.transport = transport
        self.replace = cfg.fault.enabled
        self.restarts = RestartPolicy(cfg.fault.restarts_per_hour, cfg.fault.crash_loop)
        self.log_dir = self.run_dir / "logs" / "actors"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # the evaluator lives beside the learner; a host that only adds actors runs actors only
        self.evaluator = with_learner and bool(cfg.selfplay.eval_every)
        self.processes = (cfg.launch.nproc if with_learner else 0) + cfg.selfplay.actors + int(self.evaluator)
        self.relay = relay  # node rank 0's JobRelay when other hosts may add actors (shoal/selfplay/relay.py)
        self.ctx = workers.start_forkserver()
        self.members: list[Member] = []
        self.delayed: list[tuple[float, str, int, int]] = []  # (when, role, slot, incarnation) backing off
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="selfplay-actors", daemon=True)

    def start(self) -> None:
        self.transport.clear_marks(self.run_dir)  # a resumed run is neither finished nor failed
        for slot in range(self.cfg.selfplay.actors):
            self.members.append(self._spawn("actor", slot, self._first_incarnation("actor", slot)))
        if self.evaluator:
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

    def _watch(self) -> None:
        while not self.stopping.is_set():
            if self.relay is not None:
                self._relay_step()
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
            say(f"{name} left after a stop signal ({code - 128}); not replaced")
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
        say(f"{name} exited with {code}; starting a replacement"
                  + (f" in {decision.delay:.0f}s" if decision.delay else ""))
        self._record("replaced", role=member.role, slot=member.slot, delay=round(decision.delay, 3))
        self.delayed.append((now + decision.delay, member.role, member.slot, member.incarnation + 1))

    def _relay_step(self) -> None:
        try:
            for host in self.relay.joined():
                say(f"host {host} joined with actors")
                self._record("joined", role="host", host=host)
            self.relay.step()
        except Exception as err:  # said at every tick it happens; the watch over the actors must go on
            say(f"self-play relay to other hosts failed: {err!r}")

    def _slot_key(self, member: Member) -> int:
        return member.slot if member.role == "actor" else -1 - member.slot

    def _fail(self, text: str) -> None:
        say(text)
        self.transport.mark_failed(self.run_dir, text)

    def stop(self) -> None:
        """End the pool: actors are killed (an unfinished batch is never published); after a learner
        that finished, the evaluator first evaluates the last version."""
        evaluators = [m for m in self.members if m.role == "evaluator" and m.proc.exitcode is None]
        if self.transport.finished(self.run_dir) and evaluators:
            say("waiting for the evaluator's evaluation of the last weight version")
            for member in evaluators:
                member.proc.join()
        self.stopping.set()
        self.thread.join()
        if self.relay is not None:  # other hosts' actors leave on the job's end
            self.relay.step()
            self.relay.end("stopped")
            self.relay.wait_for_hosts(RELAY_GOODBYE)
        for member in self.members:
            workers.kill(member.proc)


RELAY_GOODBYE = 5.0  # seconds node rank 0 waits for joined hosts to see the job's end before its store goes


def start_actors(cfg: Config, worker_args: list[str], run_dir: Path, *, rendezvous, verbose: bool) -> ActorPool:
    """Start a self-play run's actors and evaluator on this host, before its learner ranks; with
    `--nnodes` > 1, host the store other hosts' actors join through on the `--rdzv` port."""
    relay = None
    if rendezvous.nnodes > 1:
        import torch.distributed as dist
        from datetime import timedelta
        from shoal.selfplay.relay import JobRelay, job_meta
        host, _, port = rendezvous.endpoint.rpartition(":")
        store = dist.TCPStore(host, int(port), None, True, timeout=timedelta(seconds=rendezvous.timeout),
                              wait_for_workers=False)
        relay = JobRelay(store, run_dir, job_meta(cfg.selfplay))
        print(f"shoal: self-play job open to other hosts' actors at {rendezvous.endpoint} "
              f"(shoal launch ... --node-rank K --rdzv {rendezvous.endpoint})", file=sys.stderr, flush=True)
    pool = ActorPool(cfg, worker_args, run_dir, verbose=verbose, relay=relay)
    pool.start()
    return pool


def actor_host_dir(cfg: Config, node_rank: int) -> Path:
    """The run directory of a host that adds actors: `<log.dir>/<log.name>-node<K>`, its own (the
    job's files stay on node rank 0), emptied of a previous job's weights and games."""
    import shutil
    from shoal import config as config_module
    run_dir = Path(cfg.log.dir) / f"{cfg.log.name}-node{node_rank}"
    shutil.rmtree(run_dir / "selfplay", ignore_errors=True)
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(config_module.to_toml(cfg))
    return run_dir


def run_actor_host(cfg: Config, worker_args: list[str], run_dir: Path, endpoint: str, *, verbose: bool) -> int:
    """A host that adds `selfplay.actors` actors to the running job whose node rank 0 listens at
    `endpoint`, until the job ends; the exit code: 0 when the job finished, 1 when it failed or this
    host's actors did, 3 when the job stopped or its store is gone (start this host again to rejoin),
    128 + a signal after a stop signal."""
    import torch.distributed as dist
    from datetime import timedelta
    from shoal.config import ConfigError
    from shoal.runtime.protocol import STORE_LOST_EXIT, STOP_SIGNALS
    from shoal.selfplay import transport
    from shoal.selfplay.relay import HostRelay, JobMismatch, job_meta
    host, _, port = endpoint.rpartition(":")
    store = dist.TCPStore(host, int(port), None, False, timeout=timedelta(seconds=cfg.launch.rdzv_timeout),
                          wait_for_workers=False)
    try:
        relay = HostRelay(store, run_dir, job_meta(cfg.selfplay))
    except JobMismatch as err:
        raise ConfigError(str(err)) from None
    stop = []
    for signum in STOP_SIGNALS:
        signal.signal(signum, lambda number, frame: stop.append(number))
    pool = ActorPool(cfg, worker_args, run_dir, verbose=verbose, with_learner=False)
    pool.start()
    say(f"host {relay.host}: {cfg.selfplay.actors} actors joined the self-play job at {endpoint}; "
        f"their logs are in {pool.log_dir}")
    try:
        while True:
            try:
                end = relay.step()
            except (RuntimeError, OSError) as err:  # c10d's store errors are RuntimeErrors
                say(f"the job's store at {endpoint} is gone ({str(err).splitlines()[0]}): node rank 0 ended; "
                    f"this host stops")
                return STORE_LOST_EXIT
            if end:
                transport.mark_finished(run_dir)  # this host's actors leave
                relay.leave()
                say(f"the job ended ({end}); this host stops")
                return 0 if end == "finished" else 1 if end.startswith("failed") else STORE_LOST_EXIT
            if stop:
                say(f"stopped by signal {stop[0]}; this host's actors leave, the job goes on")
                return 128 + stop[0]
            failure = transport.failure(run_dir)  # this host's pool gave up on its actors
            if failure:
                say(f"this host's actors failed: {failure}")
                return 1
            time.sleep(TICK)
    finally:
        pool.stop()
