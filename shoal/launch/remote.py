"""A host that adds workers to a running fault-tolerant job: `shoal launch --node-rank K` (K > 0).

Node rank 0's launcher (shoal/launch/supervisor.py) hosts the membership store on the
`--rdzv` port and runs the coordinator. Every other host runs this smaller launcher: it
starts its `launch.nproc` workers pointed at that store, restarts any that die (as
shoal/launch/restarts.py decides) and never coordinates anything itself, so a host can come
and go while training goes on. Its workers ask to join like any replacement: they enter
at the next step boundary (up to `fault.max_workers` in all) and receive the current state
from a live peer, so a host may join long after the job started.

A worker of this host exits with

- 0 when training finished (the job's last step was committed);
- 2 for a user mistake it found (its one-line error is shown, the host stops);
- 3 when the job's store is gone (node rank 0's launcher ended): this host stops too;
- 128 + a signal after a stop signal (SIGTERM, ...): it left cleanly and is not restarted;
- anything else (crash, kill): it is restarted.

A stop signal to this launcher is passed to its workers: they leave after the step in flight.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from shoal.config import Config
from shoal.config import USER_ERROR
from shoal.runtime import protocol
from shoal.launch.restarts import RestartPolicy
from shoal.launch import workers
from shoal.launch.supervisor import TICK
from shoal.launch.workers import worker_failure_text
from shoal.runtime.protocol import STORE_LOST_EXIT


@dataclass
class _Worker:
    slot: int
    member: int
    proc: object
    incarnation: int
    log: Path | None  # None when its output goes to the console (--verbose)


class RemoteHost:
    """The workers of one non-coordinating host of a fault-tolerant job."""

    def __init__(self, cfg: Config, worker_args: list[str], run_dir: Path, endpoint: str, *, verbose: bool = False):
        import torch.distributed as dist
        self.cfg, self.worker_args, self.endpoint, self.verbose = cfg, worker_args, endpoint, verbose
        self.log_dir = Path(run_dir) / "logs" / "workers"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        host, _, port = endpoint.rpartition(":")
        self.store = dist.TCPStore(host, int(port), None, False, timeout=timedelta(seconds=cfg.launch.rdzv_timeout),
                                   wait_for_workers=False)
        self.ctx = workers.start_forkserver()
        self.failures: list[str] = []
        self.restarts = RestartPolicy(cfg.fault.restarts_per_hour, cfg.fault.crash_loop)
        self.delayed: list[tuple[float, int, int]] = []  # (when, index, incarnation) of restarts backing off
        self.stop_signal = 0
        self.workers = [self._start(slot, 0) for slot in range(cfg.launch.nproc)]

    def say(self, text: str) -> None:
        print(f"shoal: {text}", file=sys.stderr, flush=True)

    def _start(self, slot: int, incarnation: int) -> _Worker:
        member = self.store.add(protocol.NEXT_MEMBER, 1) - 1  # one numbering for the whole job
        # Slots are negative (launcher chaos addresses node rank 0's slots only), and no worker here
        # starts with the job's state (incarnation >= 1): each receives it from a live peer.
        env = workers.worker_env(store=self.endpoint, member=member, slot=-1 - slot, incarnation=incarnation + 1,
                                 local_workers=self.cfg.launch.nproc)
        log = None if self.verbose else self.log_dir / f"worker{member}.log"
        proc = workers.spawn(self.ctx, self.worker_args, env, log)
        self.say(f"worker {member} (slot {slot}, pid {proc.pid}) started, joining {self.endpoint}")
        return _Worker(slot, member, proc, incarnation, log)

    def _finished(self) -> bool:
        try:
            return self.store.check([protocol.FINISHED])
        except Exception:  # noqa: BLE001 - the store is gone: the job ended one way or another
            return True

    def run(self) -> int:
        previous = {signum: signal.signal(signum, self._stop) for signum in protocol.STOP_SIGNALS}
        try:
            while True:
                code = self._poll()
                if code is not None:
                    return code
                time.sleep(TICK * 10)  # process exits only: nothing here needs the store's pace
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            for worker in self.workers:
                workers.kill(worker.proc)

    def _stop(self, signum: int, frame) -> None:
        """A stop signal: this host's workers leave after the step in flight (the job goes on)."""
        self.stop_signal = self.stop_signal or signum
        self.delayed.clear()
        for worker in self.workers:
            if worker.proc.exitcode is None:
                os.kill(worker.proc.pid, signum)

    def _poll(self) -> int | None:
        running, now = 0, time.monotonic()
        for when, i, incarnation in [d for d in self.delayed if d[0] <= now]:
            self.delayed.remove((when, i, incarnation))
            self.workers[i] = self._start(self.workers[i].slot, incarnation)
        for i, worker in enumerate(self.workers):
            code = worker.proc.exitcode
            if code is None:
                running += 1
                continue
            if code in (0, None) or worker.incarnation < 0:
                continue
            if code == USER_ERROR:
                self.failures.append(worker_failure_text(worker.log))
                return USER_ERROR
            if code in (STORE_LOST_EXIT, *protocol.PREEMPTED_CODES) or self._finished() or self.stop_signal:
                worker.incarnation = -1  # done: the job ended or finished without it, or it left
                continue
            committed = self.store.check([protocol.committed(worker.member)])
            decision = self.restarts.after_exit(worker.slot, code, committed, now)
            incarnation, worker.incarnation = worker.incarnation + 1, -1
            if decision.restart:
                self.say(f"worker {worker.member} (slot {worker.slot}) exited with {code}; starting a replacement"
                         + (f" in {decision.delay:.0f}s" if decision.delay else ""))
                self.delayed.append((now + decision.delay, i, incarnation))
            else:
                self.failures.append(f"worker {worker.member} (slot {worker.slot}) {decision.reason}; its last "
                                     f"output:\n{worker_failure_text(worker.log)}")
                if code > 0:
                    return 1
        running += len(self.delayed)  # a slot backing off is still this host's
        if running and self._finished():
            # Training is over: workers still waiting for a generation have nothing left to join.
            for worker in self.workers:
                if worker.proc.exitcode is None:
                    worker.proc.join(timeout=5.0)
                    if worker.proc.exitcode is None:
                        worker.proc.kill()
                        worker.proc.join()
            return 0
        if running:
            return None
        codes = [w.proc.exitcode for w in self.workers]
        if all(code == 0 for code in codes) or self._finished():
            return 0
        if self.stop_signal:
            return protocol.preempted_exit_code(self.stop_signal)
        if any(code == STORE_LOST_EXIT for code in codes):
            self.failures.append(f"the job's launcher at {self.endpoint} is gone (its store does not answer); "
                                 f"continue with `shoal run ... --resume` where its checkpoints are")
        return 1



def join_fault_tolerant(cfg: Config, worker_args: list[str], run_dir: Path, endpoint: str, *,
                        verbose: bool = False) -> int:
    """Run this host's workers of the fault-tolerant job whose store is at `endpoint`."""
    host = RemoteHost(cfg, worker_args, run_dir, endpoint, verbose=verbose)
    code = host.run()
    for failure in host.failures if code else []:  # a host whose workers finished has nothing to explain
        print(failure if failure.startswith("shoal: error:") else f"shoal: {failure}", file=sys.stderr)
    if code == 0:
        print(f"shoal: this host's workers are done; run directory {run_dir}", file=sys.stderr)
    return code

