"""Preemption under per-step fault tolerance: SIGTERM to one worker is a clean leave (the others
regroup after the step it committed, nothing is abandoned and it is not restarted); SIGTERM to the
launcher stops every worker after the same step, with a checkpoint of that step."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from shoal.fault.audit import audit, read_records
from shoal.runtime.protocol import SAMPLE_LOG_ENV
from tests.conftest import SHOAL, fault_tolerant_job, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

JOB = fault_tolerant_job("train.steps=1000000", "launch.nproc=3", "log.progress=off", "checkpoint.every=0")


def test_sigterm_to_a_worker_is_a_clean_leave_and_to_the_launcher_a_checkpointed_stop(tmp_path):
    samples = tmp_path / "samples"
    samples.mkdir()
    run = tmp_path / "runs" / "quickstart"
    job = subprocess.Popen([SHOAL, "run", *JOB], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True, stdin=subprocess.DEVNULL, env={**os.environ, SAMPLE_LOG_ENV: str(samples)})
    try:
        def sizes() -> list[int]:
            return [r[0]["size"] for _, r in sorted(read_records(samples).items())]
        wait_for(lambda: sizes().count(3) >= 5, 120, "5 steps of 3 workers")
        events = [json.loads(line) for line in (run / "logs" / "fault_events.jsonl").read_text().splitlines()]
        leaver = next(e["pid"] for e in events if e["event"] == "start" and e["slot"] == 2)
        os.kill(leaver, signal.SIGTERM)
        wait_for(lambda: 3 in sizes() and sizes()[-5:] == [2] * 5, 120, "5 steps of the 2 that stay")
        job.send_signal(signal.SIGTERM)
        _, stderr = job.communicate(timeout=120)
    finally:
        job.kill()
    assert job.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    events = [json.loads(line) for line in (run / "logs" / "fault_events.jsonl").read_text().splitlines()]
    assert len([e for e in events if e["event"] == "start"]) == 3  # nobody was restarted
    assert sorted(e["code"] for e in events if e["event"] == "exit") == [143, 143, 143]
    logs = "".join(p.read_text() for p in (run / "logs").glob("rank*.log"))
    assert "abandoned" not in logs  # the leave and the stop came at step boundaries the workers agreed on
    assert "left after a stop signal" in stderr and "every worker stops after the step in flight" in stderr
    result = audit(samples, num_samples=7783, global_batch=32, grad_accum=1, seed=1234)
    assert not result.missing_steps and not result.duplicated and not result.disagreeing_steps, result
    saved = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert saved == [f"step_{result.steps:08d}"], (saved, result.steps)  # the last committed step
