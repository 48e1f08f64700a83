"""Elastic membership: a job of 2 workers grows to 3 when a worker from elsewhere joins
mid-run (receiving state from a live peer), then shrinks back to 2 when it is killed; no
sample is lost or repeated and the replicas stay identical throughout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from shoal.fault.audit import audit, read_records
from shoal.runtime.protocol import SAMPLE_LOG_ENV
from tests.conftest import ROOT, SHOAL, fault_tolerant_job, sigint_default, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(200)]

JOB = fault_tolerant_job("train.steps=1000000", "launch.threads=1", "launch.nproc=2", "fault.max_workers=3",
                         "log.progress=off")


def test_two_grow_to_three_and_shrink_to_two(tmp_path):
    samples = tmp_path / "samples"
    samples.mkdir()
    env = {**os.environ, SAMPLE_LOG_ENV: str(samples), "PYTHONPATH": str(ROOT)}
    job = subprocess.Popen([SHOAL, "run", *JOB], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                           preexec_fn=sigint_default)
    joiner = subprocess.Popen([sys.executable, "-m", "tests.fault.joiner", str(tmp_path / "runs")], cwd=ROOT,
                              env={**env, "SHOAL_CACHE": os.environ["SHOAL_CACHE"]}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        def sizes() -> list[int]:
            return [r[0]["size"] for _, r in sorted(read_records(samples).items())]
        wait_for(lambda: sizes().count(3) >= 20, 150, "20 steps with the joiner in the group")
        joiner.kill()  # remove it: 3 -> 2
        joiner.wait(timeout=10)
        wait_for(lambda: 3 in sizes() and sizes()[-20:] == [2] * 20, 60, "20 steps of 2 after the kill")
    finally:
        joiner.kill()
        job.send_signal(signal.SIGINT)  # the job would train a million steps; stop it as a user would
        try:
            _, stderr = job.communicate(timeout=30)
        finally:
            job.kill()
    assert job.returncode == 130, stderr

    records = read_records(samples)
    last = max(records)
    del records[last]  # the step in flight at Ctrl-C may be committed by some workers only
    num_samples = 7783  # synthetic 8192 minus the 5% held out
    result = audit(samples, num_samples=num_samples, global_batch=32, grad_accum=1, seed=1234)
    assert not result.missing_steps and not result.wrong_batch_steps and not result.duplicated, result
    assert not [s for s in result.disagreeing_steps if s < last], result
    first3, last3 = result.sizes.index(3), len(result.sizes) - result.sizes[::-1].index(3)
    assert first3 > 0 and set(result.sizes[:first3]) == {2}, "starts with 2"
    assert result.sizes.count(3) >= 20, "grows to 3"
    assert len(result.sizes[last3:]) >= 20 and set(result.sizes[last3:]) == {2}, "shrinks back to 2"
    assert "generation" in stderr and "state from worker" in stderr
