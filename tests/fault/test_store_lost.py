"""The launcher dies mid-run (a real SIGKILL): its membership store goes with it. Every worker
must exit with code 3, rank 0 of the last generation (a whole replica group saving together)
must leave a checkpoint of the last committed step, and `--resume` must continue from it to
the end, exactly as a run that was never interrupted. The lanes of a replica group may lose
the store at different store calls: two lanes of a real Gloo group, each failing at a chosen
one, must still stop at the same step as members of the same generation."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from shoal import config
from shoal.data.sampler import ShardedSampler
from shoal.fault.elastic import Replicas
from shoal.fault.errors import StoreLost
from tests.conftest import SHOAL, metric_records, shoal, wait_for
from tests.fault.test_recovery import FT
from tests.world import run_world

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

PR_SET_CHILD_SUBREAPER = 36
GROUPS = ["launch.nproc=4", "parallel.dp_replicate=2", "parallel.dp_shard=2"]


@contextlib.contextmanager
def adopting_orphans():
    """Make this process the parent of the workers a killed launcher leaves behind, so that
    their exit codes can be read."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1)
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0)
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:  # the launcher's resource tracker, once it has left
                pass


def kill_launcher(launcher: subprocess.Popen) -> None:
    """SIGKILL the launcher and the forkserver its workers were forked from, as when the whole
    `shoal run` is lost. The workers then become this process's children at once; a forkserver
    left alive would reap some of them before it noticed its parent was gone."""
    forkserver = [int(pid) for task in Path(f"/proc/{launcher.pid}/task").iterdir()
                  for pid in (task / "children").read_text().split()
                  if b"multiprocessing.forkserver" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    launcher.send_signal(signal.SIGKILL)
    for pid in forkserver:
        os.kill(pid, signal.SIGKILL)
    launcher.wait()
    for pid in forkserver:
        os.waitpid(pid, 0)


def train_losses(run: Path) -> list[tuple[int, float]]:
    """(step, loss) of every training record in the metrics, in the order they were written."""
    if not (run / "metrics.jsonl").exists():
        return []
    return [(r["step"], r["loss"]) for r in metric_records(run, "train")]


def exit_codes(pids: list[int], timeout: float) -> dict[int, int]:
    """Reap the adopted workers `pids`: their exit codes (negative: the signal that ended one)."""
    codes: dict[int, int] = {}

    def reaped() -> bool:
        for pid in set(pids) - set(codes):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes[pid] = os.waitstatus_to_exitcode(status)
        return len(codes) == len(pids)

    wait_for(reaped, timeout, "every worker to exit")
    return codes


def kill_launcher_at(args: list[str], cwd: Path, name: str, step: int) -> tuple[dict[int, int], int]:
    """Run `shoal run ARGS log.name=NAME`, kill the launcher once step `step` is logged, and
    return every worker's exit code and the last step the metrics recorded."""
    run = cwd / "runs" / name
    with adopting_orphans():
        launcher = subprocess.Popen([SHOAL, "run", *args, f"log.name={name}"], cwd=cwd, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: len(train_losses(run)) >= step, 90, f"step {step}")
        finally:
            kill_launcher(launcher)
        events = [json.loads(line) for line in (run / "logs" / "fault_events.jsonl").read_text().splitlines()]
        codes = exit_codes([e["pid"] for e in events if e["event"] == "start"], 45)
    return codes, train_losses(run)[-1][0]


def checkpoint_steps(run: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("step_")) for p in (run / "checkpoints").glob("step_*")
                  if (p / "meta.json").exists())


def resume_matches_uninterrupted(args: list[str], cwd: Path, name: str, steps: int) -> None:
    resumed = shoal("run", *args, f"log.name={name}", "--resume", cwd=cwd, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    clean = shoal("run", *args, "log.name=clean", cwd=cwd, timeout=120)
    assert clean.returncode == 0, clean.stderr[-3000:]
    # Every step once (none lost or repeated across the kill), each with the uninterrupted loss.
    assert train_losses(cwd / "runs" / name) == train_losses(cwd / "runs" / "clean")
    assert len(train_losses(cwd / "runs" / "clean")) == steps


# Steps enough for the launcher to be killed mid-run: whole-model replicas of the tiny MLP
# run several times faster than replica groups.
@pytest.mark.parametrize("layout, steps", [pytest.param(["launch.nproc=2"], 300, id="workers"),
                                           pytest.param(GROUPS, 100, id="replica-groups")])
def test_launcher_killed_mid_run_leaves_a_checkpoint_to_resume(tmp_path, layout, steps):
    args = [*FT, *layout, f"train.steps={steps}", "checkpoint.every=100000", "log.progress=off"]
    codes, last = kill_launcher_at(args, tmp_path, "killed", 10)
    run = tmp_path / "runs" / "killed"
    logs = "".join(p.read_text() for p in (run / "logs" / "workers").glob("*.log"))
    assert last < steps, "the run finished before the launcher was killed"
    assert set(codes.values()) == {3}, (codes, logs[-3000:])
    # Only the checkpoint written when the store was lost can exist, at the last committed step.
    assert checkpoint_steps(run) == [last], (checkpoint_steps(run), last, logs[-3000:])
    assert f"stopping with a checkpoint at step {last}" in logs
    resume_matches_uninterrupted(args, tmp_path, "killed", steps)


class LosingStore(dist.HashStore):
    """Works until a key starting with `lost_at` is touched, then fails as a dead launcher's store does."""

    def __init__(self, lost_at: str):
        super().__init__()
        self.lost_at, self.lost = lost_at, False
        for gen in (1, 2):  # the coordinator's answers to the group's first two requests
            super().set(f"ft/assign/0/{gen}", str(gen))
            super().set(f"ft/gen/{gen}", json.dumps({"members": [0], "sync": False}))

    def _touch(self, keys: list[str]) -> None:
        self.lost = self.lost or any(key.startswith(self.lost_at) for key in keys)
        if self.lost:
            raise dist.DistNetworkError("Connection reset by peer")

    def set(self, key, value):
        self._touch([key])
        return super().set(key, value)

    def check(self, keys):
        self._touch(keys)
        return super().check(keys)

    def get(self, key):
        self._touch([key])
        return super().get(key)

    def wait(self, keys, timeout):
        self._touch(keys)
        return super().wait(keys, timeout)


def _lanes_stop_together(lane: int, group_size: int) -> None:
    cfg = config.load(None, ["fault.enabled=true", "fault.step_timeout=10", "fault.join_timeout=10"])
    model = torch.nn.Linear(4, 1)

    class Host:  # the TrainingHost methods a step of whole-state-holding replicas uses
        step, sampler = 0, ShardedSampler(64, 8, 0)

        def parameters(self):
            return model.parameters()

        def data_position(self):
            return self.sampler.state_dict()

        def set_data_position(self, position):
            self.sampler.load_state_dict(position)

    trainer = Host()

    def replica_group(lost_at: str) -> Replicas:
        replicas = Replicas(LosingStore(lost_at), member=0, slot=lane, incarnation=0, cfg=cfg, lane=lane,
                            group_size=group_size)
        replicas.attach(trainer)
        return replicas

    def step(replicas: Replicas):
        replicas.begin_step()
        model(torch.ones(2, 4)).sum().backward()
        outcome = replicas.reduce(2, torch.tensor(1.0))
        if outcome.applied:
            trainer.step += 1
        return outcome

    # Lane 1 loses the store publishing a step that both lanes committed; lane 0 never notices
    # by itself. Both go on to the next step's agreement and stop there, as the same master.
    replicas = replica_group("ft/progress" if lane == 1 else "nothing")
    assert step(replicas).applied and trainer.step == 1
    with pytest.raises(StoreLost):
        step(replicas)
    assert trainer.step == 1 and replicas.generation.number == 1 and replicas.is_master

    # Lane 1 loses the store waiting for its next generation, which lane 0 has already entered:
    # both stop as members of the generation they were in.
    replicas = replica_group("ft/assign/0/2" if lane == 1 else "nothing")
    assert step(replicas).applied
    replicas.regroup()
    with pytest.raises(StoreLost):
        step(replicas)
    assert replicas.generation.number == 1 and replicas.generation.rank == 0 and replicas.is_master


def test_lanes_that_lose_the_store_at_different_calls_stop_together():
    run_world(_lanes_stop_together, 2)
