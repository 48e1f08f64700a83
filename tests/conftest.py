"""Shared test set-up: the `shoal` command of this environment, a small config, a shared corpus cache."""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shoal.observe.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
SHOAL = str(Path(sys.executable).parent / "shoal")

# Small enough that a 2-worker run takes seconds on 2 cores: the debug-sized model (the
# quickstart's own is 128 wide and 4 deep, to learn in its 3 minutes).
TINY = ["data.seq_len=32", "data.max_bytes=400000", "train.batch_size=8", "train.warmup_steps=2",
        "train.eval_every=0", "launch.nproc=2",  # threads: the default, cores shared among the workers
        "model.dim=64", "model.n_layers=2"]


def torch_threads(log_text: str) -> list[int]:
    """The torch thread count each worker start reported in a log ("...; N torch threads")."""
    return [int(n) for n in re.findall(r"; (\d+) torch threads", log_text)]


def threads_for(workers_on_host: int) -> int:
    """What the default thread budget gives each of `workers_on_host` workers on this machine."""
    return max(1, len(os.sched_getaffinity(0)) // workers_on_host)


@pytest.fixture(scope="session", autouse=True)
def corpus_cache(tmp_path_factory):
    """One stdlib-corpus cache for the whole session (workers inherit SHOAL_CACHE)."""
    path = tmp_path_factory.mktemp("cache")
    os.environ["SHOAL_CACHE"] = str(path)
    return path


def _ephemeral_ports() -> range:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


def free_port() -> int:
    """A port free now, for a process a test starts to listen on. Not one the kernel hands out itself
    (port 0, outgoing connections: the ephemeral range): between this check and the listener's bind,
    another test's Gloo or store could be given exactly that port (seen under two xdist workers: a
    site's plane failed with "Address already in use")."""
    import random
    ephemeral = _ephemeral_ports()
    choices = [port for port in range(20000, 32768) if port not in ephemeral]
    for port in random.sample(choices, 200):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port between 20000 and 32767")


def shoal(*args: str, cwd: Path, timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the `shoal` command as a user types it."""
    return subprocess.run([SHOAL, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)


def wait_for(condition, timeout: float = 30.0, what: str = "the condition", poll: float = 0.05):
    """Poll `condition` until it is true and return its value (files and logs written by other
    processes, a peer's state: no event to wait on); the timeout only bounds a hang."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


def metric_records(run_dir: Path, kind: str | None = None) -> list[dict]:
    """The records of a run directory's metrics.jsonl (all, or those of one `kind`: "train", "eval",
    "event", ...), read by the package's own reader."""
    return [r for r in read_metrics(run_dir) if kind is None or r.get("kind") == kind]


def train_losses(run_dir: Path) -> dict[int, float]:
    """{step: loss} of a run's training records."""
    return {r["step"]: r["loss"] for r in metric_records(run_dir, "train")}


def one_process_trainer(cfg, run_dir: Path, *, master: bool = True, **trainer_args):
    """The real Trainer wired as a worker wires it (data, model, composition), on one rank in this
    process: the reference a multi-process run is compared with, and the unit tests' Trainer
    (`trainer_args`, such as sync=, go to the Trainer)."""
    import torch

    from shoal.data import build_dataset
    from shoal.models import build_model
    from shoal.parallel.compose import parallelize
    from shoal.runtime.mesh import ParallelDims
    from shoal.train import Placement, Trainer

    torch.manual_seed(cfg.train.seed)
    train_set, val_set, spec = build_dataset(cfg.data, cfg.train.seed)
    model = build_model(cfg.model, spec)
    device = torch.device("cpu")
    composed = parallelize(model, ParallelDims.from_config(cfg.parallel, 1), None, cfg, device)
    torch.manual_seed(cfg.train.seed)
    where = Placement(dp_rank=0, dp_size=1, rank=0, device=device, master=master)
    return Trainer(cfg, composed, train_set, val_set, placement=where, run_dir=run_dir, **trainer_args)


# A small fault-tolerant `shoal run` job: an MLP on synthetic data, a step timeout of 3 s.
FAULT_TOLERANT_JOB = ["model.name=mlp", "data.source=synthetic", "train.batch_size=32", "train.warmup_steps=2",
                      "train.eval_every=0", "fault.enabled=true", "fault.step_timeout=3"]


def fault_tolerant_job(*overrides: str) -> list[str]:
    """FAULT_TOLERANT_JOB with `overrides` after it (a later key=value wins)."""
    return [*FAULT_TOLERANT_JOB, *overrides]


def _orphans_of(folder: Path) -> list[tuple[int, str]]:
    """Processes left behind in `folder`: re-parented to init (their launcher is gone) and running
    there or naming it on their command line, with their descendants."""
    table: dict[int, tuple[int, str, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state, ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
            if state in ("Z", "X"):  # exited, not yet reaped: nothing left to run
                continue
            ppid = int(ppid)
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            cwd = os.readlink(entry / "cwd")
        except (OSError, IndexError, ValueError):  # gone meanwhile, or a kernel thread
            continue
        table[int(entry.name)] = (ppid, cmdline, cwd)
    where = str(folder)
    roots = {pid for pid, (ppid, cmdline, cwd) in table.items()
             if ppid == 1 and pid != os.getpid() and (where in cmdline or cwd.startswith(where))}
    left, todo = set(roots), list(roots)
    while todo:
        parent = todo.pop()
        children = [pid for pid, (ppid, _, _) in table.items() if ppid == parent and pid not in left]
        left.update(children)
        todo.extend(children)
    return sorted((pid, table[pid][1]) for pid in left)


@pytest.fixture(autouse=True)
def no_leftover_processes(request):
    """A slow test's processes do not outlive it: a test that fails (or forgets) while a launcher's
    workers or a stopped actor run would leave them eating the 2 cores of every later test. They are
    killed after the test and named in a warning."""
    yield
    folder = getattr(request.node, "funcargs", {}).get("tmp_path")  # the test's folder, set up for it
    if not request.node.get_closest_marker("slow") or folder is None:
        return
    # A worker ends with its launcher (PR_SET_PDEATHSIG): the signal is sent as the launcher dies, so
    # one may still be on its way out when the test returns. Give such a process a moment to go.
    deadline = time.monotonic() + 5
    while (left := _orphans_of(folder)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid, _ in left:
        try:
            os.kill(pid, signal.SIGKILL)  # a SIGSTOPped one too
        except ProcessLookupError:
            pass
    if left:
        import warnings
        warnings.warn(f"{request.node.nodeid}: {len(left)} processes outlived the test and were killed: "
                      + "; ".join(f"{pid} {cmd[:120]}" for pid, cmd in left))


def _logging_state() -> dict:
    """What decides whether a `shoal.*` record reaches pytest's caplog handler on the root logger."""
    manager = logging.root.manager
    return {"disable": manager.disable, "root level": logging.root.level,
            **{name: (logger.disabled, logger.propagate, logger.level) for name, logger in list(manager.loggerDict.items())
               if name.startswith("shoal") and isinstance(logger, logging.Logger)}}


@pytest.fixture(autouse=True)
def logging_left_as_found(request):
    """A test that leaves logging switched off (a logger disabled or not propagating, a global
    `logging.disable`, the root logger raised to ERROR as a local Ray's LoggingConfig did) would blind every later test's `caplog` in its process, and which tests
    follow it depends on how xdist hands out files: the state is put back and the test named."""
    before = _logging_state()
    yield
    after = _logging_state()
    changed = sorted((key for key in after if key in before and after[key] != before[key]), key=str)
    changed += sorted(key for key in after if key not in before and (after[key][0] or not after[key][1]))
    if not changed:
        return
    logging.disable(before["disable"])
    logging.root.setLevel(before["root level"])
    for name in changed:
        if name.startswith("shoal"):
            disabled, propagate, level = before.get(name, (False, True, logging.NOTSET))
            logger = logging.getLogger(name)
            logger.disabled, logger.propagate = disabled, propagate
            logger.setLevel(level)
    import warnings
    warnings.warn(f"{request.node.nodeid} changed logging ({', '.join(changed[:6])}): put back")


def sigint_default() -> None:
    """`preexec_fn` for a child the test stops with SIGINT (as Ctrl-C would): a test run started
    as a shell's background job has SIGINT ignored, and the child would inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def crash_after_checkpoint(args: list[str], cwd: Path, name: str, step: int) -> None:
    """Start `shoal run ARGS log.name=NAME` and SIGKILL the launcher and its workers at once
    as soon as the checkpoint of `step` is complete (or the run ended)."""
    proc = subprocess.Popen([SHOAL, "run", *args, f"log.name={name}"], cwd=cwd, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = Path(cwd) / "runs" / name / "checkpoints" / f"step_{step:08d}" / "meta.json"
    deadline = time.monotonic() + 120
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


# --- Test tiers -------------------------------------------------------------------------------
# `make check` runs `pytest -m "not slow"`: the fast tier, one process per test. A test that
# starts processes (workers, the `shoal` command, a cluster) is `slow`; the `distributed`, `e2e`
# and `netns` markers imply it. A test left unmarked that starts a process fails with the fix, so
# a new multi-process test cannot land in the fast tier unnoticed.
IMPLY_SLOW = ("distributed", "e2e", "netns", "machine")

# `make test` runs the suite on two pytest-xdist workers (`--dist loadgroup`), one file at a time per
# worker: a file's tests run in order in one process, so its module-scoped fixtures (a trained
# checkpoint, a federation server) are built once and a test may build on the one before it. A test
# that holds a machine-wide resource (network namespaces and their address plan, a Ray or SLURM
# cluster) is `machine` (`netns` implies it), and all of those run on one worker, one after the other.
IMPLY_MACHINE = ("netns",)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        two_hosts = "two_hosts" in getattr(item, "fixturenames", ())  # tests/e2e/conftest.py's namespaces
        if not item.get_closest_marker("machine") and (two_hosts or any(item.get_closest_marker(m) for m in IMPLY_MACHINE)):
            item.add_marker(pytest.mark.machine)
        machine = item.get_closest_marker("machine") is not None
        item.add_marker(pytest.mark.xdist_group("machine" if machine else item.nodeid.split("::")[0]))
        if not item.get_closest_marker("slow") and any(item.get_closest_marker(m) for m in IMPLY_SLOW):
            item.add_marker(pytest.mark.slow)
    # xdist hands out files in the order they come: the machine tests first (the longest unit), then
    # files with slow tests, and the fast files last, where their few seconds fill the gap while the
    # other worker ends its last long file. A stable sort: a file's tests keep their order.
    slow_files = {item.nodeid.split("::")[0] for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: 0 if item.get_closest_marker("machine") else
               1 if item.nodeid.split("::")[0] in slow_files else 2)


class _ProcessStartGuard:
    """Refuses process starts (subprocess, fork, multiprocessing spawn) while a fast test runs."""

    def __init__(self):
        self.started: list[str] = []
        self._saved: list[tuple[object, str, object]] = []

    def install(self, nodeid: str) -> None:
        import multiprocessing.util

        def refuse(what):
            def start(*args, **kwargs):
                self.started.append(what)
                raise RuntimeError(f"{nodeid} starts a process ({what}) but is not marked "
                                   "@pytest.mark.slow: mark it (or its module) slow")
            return start

        for owner, name in ((subprocess.Popen, "_execute_child"), (os, "fork"),
                            (multiprocessing.util, "spawnv_passfds")):
            self._saved.append((owner, name, getattr(owner, name)))
            setattr(owner, name, refuse(f"{getattr(owner, '__name__', owner)}.{name}"))

    def remove(self) -> None:
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved.clear()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    if not item.get_closest_marker("slow"):
        item._process_guard = _ProcessStartGuard()
        item._process_guard.install(item.nodeid)
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    try:
        return (yield)
    finally:
        guard = getattr(item, "_process_guard", None)
        if guard is not None:
            guard.remove()
            if guard.started:
                pytest.fail(f"started a process ({guard.started[0]}) without @pytest.mark.slow", pytrace=False)
