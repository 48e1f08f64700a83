"""A second host adds actors to a running self-play job, as a user on another machine types it:
`shoal launch CONFIG --nnodes 2 --node-rank 1 --rdzv HOST:PORT` (here a second launcher on this
machine, with a run directory of its own). With node rank 0's own actor stopped (SIGSTOP), the
learner trains whole versions on the second host's games alone; both launchers end when the job
does, and every batch is ingested once and whole."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from shoal.selfplay import transport
from tests.conftest import SHOAL, free_port, metric_records, wait_for
from tests.selfplay.test_runtime import EXAMPLE, SMALL, _pid, ingested_exactly_once

pytestmark = pytest.mark.slow


def test_a_second_host_adds_actors_to_a_running_job(tmp_path):
    endpoint = f"127.0.0.1:{free_port()}"
    job_dir, host_dir = tmp_path / "node0", tmp_path / "node1"
    common = [EXAMPLE, *SMALL, "selfplay.actors=1", "selfplay.eval_every=0"]

    def where(node_rank: int) -> list[str]:
        return ["--nnodes", "2", "--node-rank", str(node_rank), "--rdzv", endpoint]
    run = job_dir / "tictactoe"
    job_out, host_out = tmp_path / "node0.txt", tmp_path / "node1.txt"
    with job_out.open("w") as sink:
        job = subprocess.Popen([SHOAL, "launch", *common, "selfplay.versions=12", f"log.dir={job_dir}", *where(0)],
                               cwd=tmp_path, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    host = actor = None
    try:
        wait_for(lambda: job.poll() is not None or transport.latest_version(run) >= 1, 120,
                 "the job's first trained version")
        assert job.poll() is None, job_out.read_text()[-3000:]
        actor = _pid(run / "logs" / "actors" / "actor0.log", r"incarnation 0, pid (\d+)")
        os.kill(actor, signal.SIGSTOP)  # from now on only the second host's actor plays new games
        with host_out.open("w") as sink:
            host = subprocess.Popen([SHOAL, "launch", *common, f"log.dir={host_dir}", *where(1)],
                                    cwd=tmp_path, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

        def remote_only_version():
            assert host.poll() is None and job.poll() is None, host_out.read_text()[-3000:]
            return any(batches and all(b.startswith("h1-actor0-") for b in batches)
                       for batches in transport.read_ledger(run))
        wait_for(remote_only_version, 120, "a version trained on the second host's games alone")
        os.kill(actor, signal.SIGCONT)
        job.wait(timeout=240)
        host.wait(timeout=60)
    finally:
        for proc in (job, host):
            if proc is not None:
                proc.kill()
    assert job.returncode == 0, job_out.read_text()[-3000:]
    assert host.returncode == 0, host_out.read_text()[-3000:]
    assert "host 1: 1 actors joined the self-play job" in host_out.read_text()
    assert "the job ended (finished)" in host_out.read_text()

    ledger = ingested_exactly_once(run, games_per_batch=4)
    assert len(ledger) == 12
    remote = [b for batches in ledger for b in batches if b.startswith("h1-")]
    assert remote, "the second host's games were ingested"
    # the second host's own directory holds what its actor played, as it played it
    played = transport.local_batches(host_dir / "tictactoe-node1")
    assert {b.removeprefix("h1-") for b in remote} <= set(played)
    assert any(e["event"] == "joined" and e.get("role") == "host" and e["host"] == 1 for e in metric_records(run, "event"))
