"""A fault-tolerant job across two hosts (network namespaces): node rank 0's `shoal launch`
hosts membership; a second host's `shoal launch` adds its worker to the running job, that
worker is SIGKILLed and restarted by its own launcher, and training finishes on both hosts
with no sample lost or repeated and the replicas identical at every step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from pathlib import Path

import pytest

from shoal.fault.audit import audit, read_records
from shoal.runtime.protocol import SAMPLE_LOG_ENV
from tests.conftest import SHOAL, fault_tolerant_job, free_port, torch_threads, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

STEPS = 2000  # enough steps for the replacement to train 10 with the first host after it is admitted
JOB = fault_tolerant_job(f"train.steps={STEPS}", "launch.nproc=1", "log.progress=off", "checkpoint.every=0")


class Launcher:
    """A `shoal launch` in a namespace, its stderr collected as it comes."""

    def __init__(self, host: str, link: str, node_rank: int, endpoint: str, cwd, env):
        self.lines: list[str] = []
        # Each "host" gets a core of its own, as separate machines would: the default thread
        # budget reads the cores it may use and gives its one worker all of them (here 1).
        self.proc = subprocess.Popen(
            ["taskset", "-c", str(node_rank % len(os.sched_getaffinity(0))),
             "ip", "netns", "exec", host, SHOAL, "launch", "--nnodes", "2", "--node-rank", str(node_rank),
             "--rdzv", endpoint, *JOB], cwd=cwd, env={**env, "GLOO_SOCKET_IFNAME": link},
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True)
        self.reader.start()

    def text(self) -> str:
        return "".join(self.lines)

    def finish(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.proc.kill()
            self.reader.join(timeout=5)


def _worker_pid(run_dir: Path) -> int:
    """The pid of the first host's worker, from its launcher's event log."""
    events = run_dir / "logs" / "fault_events.jsonl"
    starts = [json.loads(line) for line in events.read_text().splitlines() if '"start"' in line] \
        if events.exists() else []
    return starts[0]["pid"] if starts else 0


def _join_requests(run_dir: Path) -> int:
    """How many times a worker of the second host has asked to join (its log says so after posting
    the request to the store)."""
    return sum(log.read_text().count("asking to join") for log in (run_dir / "logs").glob("rank*.log")
               if log.name != "rank0.log")


def test_a_second_host_joins_loses_its_worker_and_rejoins(tmp_path, two_hosts):
    """Paced by events, not by the job's length: the test holds the first host's worker with
    SIGSTOP while the second host's worker (and later its replacement) starts and asks to join,
    and lets it go on once the request is in the store. A stopped member is never left out as
    hung: the coordinator waits for old members to report before it forms a generation."""
    samples = tmp_path / "samples"
    samples.mkdir()
    env = {**os.environ, SAMPLE_LOG_ENV: str(samples)}
    (host_a, link_a), (host_b, link_b) = two_hosts
    endpoint = f"10.77.0.1:{free_port()}"
    run_dir = tmp_path / "runs" / "quickstart"
    first = Launcher(host_a, link_a, 0, endpoint, tmp_path, env)
    second = None
    try:
        def sizes() -> list[int]:
            return [r[0]["size"] for _, r in sorted(read_records(samples).items())]
        wait_for(lambda: len(sizes()) >= 1, 90, "the first host to train alone")
        worker_a = wait_for(lambda: _worker_pid(run_dir), 30, "the first host's worker pid")
        os.kill(worker_a, signal.SIGSTOP)
        second = Launcher(host_b, link_b, 1, endpoint, tmp_path, env)  # a host added to the running job
        wait_for(lambda: _join_requests(run_dir) >= 1, 120, "the second host's worker to ask to join")
        os.kill(worker_a, signal.SIGCONT)
        wait_for(lambda: sizes().count(2) >= 10, 90, "10 steps with the second host's worker")
        started = [line for line in second.lines if "started, joining" in line]
        pid = int(started[0].split("pid ")[1].split(")")[0])
        os.kill(worker_a, signal.SIGSTOP)
        os.kill(pid, signal.SIGKILL)  # the second host's launcher must restart it
        killed_at = len(sizes())
        wait_for(lambda: _join_requests(run_dir) >= 2, 120, "the replacement to ask to join")
        os.kill(worker_a, signal.SIGCONT)
        wait_for(lambda: sizes()[killed_at:].count(2) >= 10, 90, "10 steps with the replacement")
        assert first.finish(120) == 0, first.text()
        assert second.finish(30) == 0, second.text()
    finally:
        first.proc.kill()
        if second is not None:
            second.proc.kill()

    # Each host runs one worker at a time (launch.nproc = 1), replacements included: each gets its host's core.
    logs = sorted((run_dir / "logs").glob("rank*.log"))
    assert len(logs) == 3 and all(torch_threads(log.read_text()) == [1] for log in logs), logs
    result = audit(samples, num_samples=7783, global_batch=32, grad_accum=1, seed=1234)
    assert not result.missing_steps and not result.wrong_batch_steps and not result.duplicated, result
    assert not result.disagreeing_steps, result  # the replicas held identical parameters at every step
    assert len(result.sizes) == STEPS
    assert result.sizes[0] == 1 and result.sizes[-1] == 2
    assert "starting a replacement" in second.text()
    # The coordinator sent state to the joining worker, and again to its replacement.
    assert first.text().count("state from worker") >= 2, first.text()
