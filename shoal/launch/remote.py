"""A host that adds workers to a running fault-tolerant job: `shoal launch --node-rank K` (K > 0).

Node rank 0's launcher (shoal/launch/supervisor.py) hosts the membership store on the
`--rdzv` port and runs the coordinator. Every other host runs this smaller launcher: it
starts its `launch.nproc` workers pointed at that store, restarts any that die (up to
`fault.max_restarts` per slot) and never coordinates anything itself, so a host can come
and go while training goes on. Its workers ask to join like any replacement: they enter
at the next step boundary (up to `fault.max_workers` in all) and receive the current state
from a live peer, so a host may join long after the job started.

A worker of this host exits with

- 0 when training finished (the job's last step was committed);
- 2 for a user mistake it found (its one-line error is shown, the host stops);
- 3 when the job's store is gone (node rank 0's launcher ended): this host stops too;
- anything else (crash, signal): it is restarted.
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
from shoal.launch.supervisor import FINISHED_KEY, TICK, _worker_main, start_forkserver, worker_failure_text

STORE_LOST = 3


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
        self.ctx = start_forkserver()
        self.failures: list[str] = []
        self.workers = [self._start(slot, 0) for slot in range(cfg.launch.nproc)]

    def say(self, text: str) -> None:
        print(f"shoal: {text}", file=sys.stderr, flush=True)

    def _start(self, slot: int, incarnation: int) -> _Worker:
        from shoal.fault import elastic
        from shoal.runtime.env import LOCAL_WORKERS_ENV
        member = self.store.add("ft/next_member", 1) - 1  # one numbering for the whole job
        env = {**os.environ, elastic.STORE_ENV: self.endpoint, elastic.MEMBER_ENV: str(member),
               elastic.SLOT_ENV: str(-1 - slot),  # launcher chaos addresses node rank 0's slots only
               # No worker here starts with the job's state: each receives it from a live peer.
               elastic.INCARNATION_ENV: str(incarnation + 1),
               LOCAL_WORKERS_ENV: str(self.cfg.launch.nproc)}  # this host's cores are shared among them
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SHOAL_LAUNCHER_PID"):
            env.pop(name, None)
        log = None if self.verbose else self.log_dir / f"worker{member}.log"
        proc = self.ctx.Process(target=_worker_main, args=(self.worker_args, env, str(log) if log else None), daemon=False)
        proc.start()
        self.say(f"worker {member} (slot {slot}, pid {proc.pid}) started, joining {self.endpoint}")
        return _Worker(slot, member, proc, incarnation, log)

    def _finished(self) -> bool:
        try:
            return self.store.check([FINISHED_KEY])
        except Exception:  # noqa: BLE001 - the store is gone: the job ended one way or another
            return True

    def run(self) -> int:
        try:
            while True:
                code = self._poll()
                if code is not None:
                    return code
                time.sleep(TICK * 10)  # process exits only: nothing here needs the store's pace
        finally:
            for worker in self.workers:
                if worker.proc.exitcode is None:
                    os.kill(worker.proc.pid, signal.SIGCONT)
                    worker.proc.kill()
                    worker.proc.join()

    def _poll(self) -> int | None:
        running = 0
        for i, worker in enumerate(self.workers):
            code = worker.proc.exitcode
            if code is None:
                running += 1
                continue
            if code in (0, None) or worker.incarnation < 0:
                continue
            if code == 2:
                self.failures.append(worker_failure_text(worker.log))
                return 2
            if code == STORE_LOST or self._finished():
                worker.incarnation = -1  # done: the job ended or finished without it
                continue
            if worker.incarnation < self.cfg.fault.max_restarts:
                self.say(f"worker {worker.member} (slot {worker.slot}) exited with {code}; starting a replacement")
                self.workers[i] = self._start(worker.slot, worker.incarnation + 1)
                running += 1
            else:
                worker.incarnation = -1
                self.failures.append(f"worker {worker.member} exited with {code}; no restarts left:\n"
                                     f"{worker_failure_text(worker.log)}")
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
        if any(code == STORE_LOST for code in codes):
            self.failures.append(f"the job's launcher at {self.endpoint} is gone (its store does not answer); "
                                 f"continue with `shoal run ... --resume` where its checkpoints are")
        return 1



def join_fault_tolerant(cfg: Config, worker_args: list[str], run_dir: Path, endpoint: str, *,
                        verbose: bool = False) -> int:
    """Run this host's workers of the fault-tolerant job whose store is at `endpoint`."""
    host = RemoteHost(cfg, worker_args, run_dir, endpoint, verbose=verbose)
    code = host.run()
    for failure in host.failures:
        print(failure if failure.startswith("shoal: error:") else f"shoal: {failure}", file=sys.stderr)
    if code == 0:
        print(f"shoal: this host's workers are done; run directory {run_dir}", file=sys.stderr)
    return code

