"""The restart policy of the fault-tolerant launcher, with real processes and signals: a slot is
replaced however often its worker dies after committing steps, a slot that crashes before its
first step backs off and then stops the job with its traceback, and a failure that leaves one
worker holding the training state makes it save a checkpoint that the job restarts from when
that worker dies too."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from shoal.launch.restarts import RestartPolicy
from tests.conftest import ROOT, SHOAL, fault_tolerant_job, wait_for

pytestmark = pytest.mark.timeout(240)

FT = fault_tolerant_job("launch.nproc=2", "log.progress=off", "checkpoint.every=0")


def test_policy_has_no_lifetime_cap_backs_off_crashes_and_keeps_a_rate_budget():
    policy = RestartPolicy(restarts_per_hour=0, crash_loop=3)
    assert all(policy.after_exit(0, -9, True, now=float(t)).restart for t in range(500))  # killed 500 times
    first, second = policy.after_exit(1, 1, False, 0.0), policy.after_exit(1, 1, False, 1.0)
    assert (first.restart, first.delay, second.restart, second.delay) == (True, 1.0, True, 2.0)
    stop = policy.after_exit(1, 1, False, 3.0)
    assert not stop.restart and "crashed 3 times in a row" in stop.reason
    assert policy.after_exit(2, -9, False, 0.0).delay == 0.0  # a kill before the first step is no crash
    budget = RestartPolicy(restarts_per_hour=2, crash_loop=3)
    assert [budget.after_exit(0, -9, True, t).restart for t in (0.0, 10.0, 20.0)] == [True, True, False]
    assert budget.after_exit(0, -9, True, 3600.0).restart  # the oldest restart left the hour


def run(args: list[str], cwd, chaos: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    out = subprocess.run([SHOAL, "run", *args, "--chaos", chaos], cwd=cwd, capture_output=True, text=True,
                         timeout=200, stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
    events = (cwd / "runs" / "quickstart" / "logs" / "fault_events.jsonl").read_text().splitlines()
    return out, [json.loads(line) for line in events]


@pytest.mark.slow
def test_a_crash_loop_backs_off_then_stops_the_job_naming_the_slot_and_its_traceback(tmp_path):
    # Slot 1 is killed at step 3; every replacement crashes at start. The job would train a
    # million steps: only the crash loop can end it.
    out, events = run([*FT, "model.factory=tests.fault.crashing_model:build", "train.steps=1000000",
                       "fault.crash_loop=3"], tmp_path, "kill=1,step=3")
    assert out.returncode == 1, out.stderr[-3000:]
    starts = [e for e in events if e["event"] == "start" and e["slot"] == 1]
    assert len(starts) == 4  # the first worker, then three replacements that crash
    assert "starting a replacement in 1s" in out.stderr and "starting a replacement in 2s" in out.stderr
    assert "worker" in out.stderr and "(slot 1) crashed 3 times in a row" in out.stderr
    assert "RuntimeError: this replacement cannot start" in out.stderr  # its traceback, shown


@pytest.mark.slow
def test_the_last_holder_of_the_state_saves_and_the_job_restarts_from_it(tmp_path):
    # Slot 1 is killed at step 5 and its replacements crash: slot 0 alone holds the state and saves
    # it. Once that checkpoint is on disk the test kills slot 0 too: nobody holds the state, and with
    # checkpoint.every = 0 only the checkpoint it saved lets its replacement go on.
    run_dir = tmp_path / "runs" / "quickstart"
    job = subprocess.Popen([SHOAL, "run", *FT, "train.steps=1000000", "fault.crash_loop=100",
                            "model.factory=tests.fault.crashing_model:build", "--chaos", "kill=1,step=5"],
                           cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           stdin=subprocess.DEVNULL,
                           env={**os.environ, "PYTHONPATH": str(ROOT), "SHOAL_TEST_CRASH_SLOT": "1"})
    try:
        saved = wait_for(lambda: sorted((run_dir / "checkpoints").glob("step_*")), 120, "the lone holder's checkpoint")
        events = [json.loads(line) for line in (run_dir / "logs" / "fault_events.jsonl").read_text().splitlines()]
        os.kill(next(e["pid"] for e in events if e["event"] == "start" and e["slot"] == 0), signal.SIGKILL)
        logs = run_dir / "logs"
        restored = wait_for(lambda: [line for log in logs.glob("rank*.log") for line in log.read_text().splitlines()
                                     if "restored the checkpoint of step" in line], 120, "the restore")
        job.send_signal(signal.SIGTERM)  # the job would train a million steps
        _, stderr = job.communicate(timeout=120)
    finally:
        job.kill()
    assert job.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "every worker holding the training state is gone: restarting from the checkpoint of step" in stderr
    step = int(saved[0].name.split("_")[1])
    assert step >= 5 and restored[0].endswith(f"restored the checkpoint of step {step}"), (saved, restored)
    logs_text = "".join(p.read_text() for p in logs.glob("rank*.log"))
    assert f"the only worker holding the training state: saving a checkpoint at step {step}" in logs_text
