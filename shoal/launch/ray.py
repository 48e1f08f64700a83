"""`shoal run CONFIG --ray [ADDRESS]`: the same workers on a Ray cluster, through Ray Train.

Ray Train's `TorchTrainer` places `launch.nproc` workers (`ScalingConfig`), starts their
process group (Gloo, or NCCL with GPUs) and calls `_train_loop` in each; the loop calls
`shoal.worker.train` unchanged, which adopts Ray's process group (shoal/runtime/env.py).
So the model, data order, checkpoints and metrics are those of `shoal run`.

- Metrics: rank 0 writes every step to `<run dir>/metrics.jsonl` as always; a thread in every
  Ray worker follows that file and hands the training record of every `log.every`-th step (and
  of the last) to `ray.train.report`, as TensorBoard gets them. Ray requires every worker to
  report the same number of times (each report is a barrier across the workers, some
  milliseconds to seconds), which is why all of them follow rank 0's file rather than rank 0
  reporting alone, and why the reported steps are fixed in advance; the run directory is on a
  filesystem every worker sees anyway, as the checkpoints need.
- Checkpoints: Distributed Checkpoint writes them into the run directory, so `--resume`
  works as for `shoal run`. When Ray restarts the worker group after a failure
  (`launch.max_restarts`, Ray's `FailureConfig`), the new group continues from the newest
  checkpoint of this run.
- Per-step fault tolerance (`fault.enabled`) is not offered here: it needs Shoal's launcher to
  own the worker processes, the membership store and the rebuilding of process groups, while
  Ray Train owns all three. A restart from the last checkpoint is what Ray gives.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

from shoal.config import Config, ConfigError
from shoal.runtime.checkpoint import latest_checkpoint
from shoal.observe import rundir

# The follower's pause between looks at metrics.jsonl when nothing new is there.
FOLLOW_PAUSE = 0.2
# Object store of a local Ray started for one run: the workers pass no data through it.
LOCAL_OBJECT_STORE_BYTES = 128 * 1024 * 1024


def _import_ray():
    try:
        import ray
        import ray.train  # noqa: F401  (the `ray` package alone lacks Ray Train)
        import ray.train.torch  # noqa: F401
    except ImportError:
        raise ConfigError("--ray needs Ray Train, which is not installed: pip install 'shoal[ray]'") from None
    return ray


def _check_answers(address: str, timeout: float = 5.0) -> None:
    """A Ray address that nobody answers is a one-line error, not a minute of retries."""
    parsed = urlparse(address if "://" in address else f"ray-gcs://{address}")
    if not parsed.hostname or parsed.port is None:
        raise ConfigError(f"--ray {address}: give HOST:PORT (the head's GCS port, 6379 by default) or "
                          f"ray://HOST:PORT (Ray Client, 10001 by default)")
    try:
        socket.create_connection((parsed.hostname, parsed.port), timeout=timeout).close()
    except OSError as err:
        raise ConfigError(f"--ray {address}: no Ray cluster answers there ({err.strerror or err}); "
                          f"is `ray start --head` running on {parsed.hostname}?") from None


def connect(address: str | None, num_cpus: int) -> bool:
    """Join the Ray cluster at `address`, or start a local one; returns True when it started one
    (and is to stop it). A Ray this process has already joined (a notebook's `ray.init()`) is
    used as it is."""
    ray = _import_ray()
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # Ray would otherwise report usage over the network
    if address is None:
        # Ray starts its workers at nice 15 so that its own daemons stay responsive. Here the workers
        # are the job: at nice 15 any other busy process on the machine starves them (beside two
        # CPU-bound processes, 3 training steps took minutes). Ray's job manager runs its drivers at
        # nice 0 the same way, through the raylet's environment.
        os.environ.setdefault("RAY_worker_niceness", "0")
        # No dashboard: it would need ray[default], and serves a web page nobody opens here. Ray Train's
        # clean-up actor then warns every second that the state API is away: actors log errors only.
        # That LoggingConfig also sets this process's root logger to ERROR and adds a handler to it: the
        # program that called shoal (a notebook, a script) would lose its own warnings. Put back.
        root = logging.getLogger()
        level, handlers = root.level, list(root.handlers)
        ray.init(num_cpus=num_cpus, include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                 log_to_driver=True, logging_config=ray.LoggingConfig(log_level="ERROR"))
        root.setLevel(level)
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
        return True
    try:
        ray.init(address=address, log_to_driver=True)
    except (ConnectionError, RuntimeError, TimeoutError) as err:
        raise ConfigError(f"--ray {address}: could not join the Ray cluster: {str(err).splitlines()[0]}") from None
    return False


class MetricsFollower(threading.Thread):
    """Hands the training record of every `every`-th step (and of `last_step`) in metrics.jsonl
    to `ray.train.report`, in every worker alike."""

    def __init__(self, path: Path, offset: int, last_step: int, every: int):
        super().__init__(name="shoal-ray-metrics", daemon=True)
        self.path, self.offset, self.last_step, self.every = path, offset, last_step, every
        self.stop_now = threading.Event()

    def run(self) -> None:
        import ray.train
        pending = ""
        while not self.stop_now.is_set():
            text = ""
            if self.path.exists():
                with self.path.open() as file:
                    file.seek(self.offset)
                    text = file.read()
                    self.offset = file.tell()
            pending += text
            *lines, pending = pending.split("\n")  # a line without its newline is still being written
            for line in lines:
                try:
                    record = json.loads(line)
                except ValueError:  # torn by a worker group that was killed mid-line
                    continue
                if record.get("kind") != "train" or (record["step"] % self.every and record["step"] < self.last_step):
                    continue
                ray.train.report(record)
                if record["step"] >= self.last_step:
                    return
            if not text:
                time.sleep(FOLLOW_PAUSE)


def _train_loop(loop_config: dict) -> None:
    """What every Ray worker runs: Shoal's worker on the run directory's config."""
    from shoal import config as config_module
    from shoal.worker import train

    logging.getLogger("ray").setLevel(logging.WARNING)  # not a line per report on rank 0's console

    run_dir = Path(loop_config["run_dir"])
    cfg = config_module.load(str(run_dir / "config.toml"), [])
    newest = latest_checkpoint(rundir.checkpoint_folder(cfg, run_dir))
    # A restarted worker group continues from the checkpoints that this run wrote since it began.
    resume = loop_config["resume"] or (newest is not None and newest.name != loop_config["first_checkpoint"])
    # Follow what this worker group writes: no worker's records can appear before every worker is
    # here (the first step's all-reduce waits for all), so all of them start at the same offset.
    metrics = run_dir / "metrics.jsonl"
    follower = MetricsFollower(metrics, metrics.stat().st_size if metrics.exists() else 0, cfg.train.steps,
                               cfg.log.every)
    follower.start()
    try:
        train(cfg, run_dir=str(run_dir), resume=str(run_dir) if resume else None)
    except BaseException:
        follower.stop_now.set()
        raise
    follower.join()


def _use_gpu(cfg: Config, ray) -> bool:
    if cfg.launch.device == "auto":
        return ray.cluster_resources().get("GPU", 0) >= 1
    return cfg.launch.device == "cuda"


def _failure_line(err: BaseException) -> tuple[str, int]:
    """The one line to show for a failed Ray run, and the exit code (2 for a user's mistake)."""
    text = str(err)
    for line in text.splitlines():
        if "ConfigError:" in line:
            return "shoal: error: " + line.split("ConfigError:", 1)[1].strip(), 2
    return f"shoal: the Ray run failed:\n{text.strip()}", 1


def check_ray(cfg: Config, address: str | None) -> None:
    """What can be checked before a run directory is made: Ray is there, the address answers."""
    if cfg.fault.enabled:
        raise ConfigError("fault.enabled is not available with --ray: Ray Train restarts the whole worker group "
                          "from the last checkpoint instead (launch.max_restarts); see docs/clusters.md")
    _import_ray()
    if address is not None:
        _check_answers(address)


def run_on_ray(cfg: Config, run_dir: Path, *, address: str | None, resume: bool, callbacks: tuple = ()) -> int:
    """Train `cfg` on `launch.nproc` Ray workers; the run directory (holding config.toml) must be
    visible to all of them. `callbacks` are Ray Train `UserCallback`s: they see every report.
    Returns the exit code `shoal run` would."""
    check_ray(cfg, address)
    ray = _import_ray()
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    run_dir = run_dir.resolve()
    started_here = connect(address, num_cpus=cfg.launch.nproc)
    try:
        use_gpu = _use_gpu(cfg, ray)
        backend = cfg.launch.backend if cfg.launch.backend != "auto" else ("nccl" if use_gpu else "gloo")
        folder = rundir.checkpoint_folder(cfg, run_dir)
        first = latest_checkpoint(folder)
        trainer = TorchTrainer(
            _train_loop,
            train_loop_config={"run_dir": str(run_dir), "resume": resume,
                               "first_checkpoint": first.name if first else None},
            torch_config=TorchConfig(backend=backend, timeout_s=cfg.launch.rdzv_timeout * 5),
            scaling_config=ScalingConfig(num_workers=cfg.launch.nproc, use_gpu=use_gpu,
                                         resources_per_worker=None if use_gpu else {"CPU": 1}),
            run_config=RunConfig(name=run_dir.name, storage_path=str(run_dir / "ray"),
                                 failure_config=FailureConfig(max_failures=cfg.launch.max_restarts),
                                 callbacks=list(callbacks)))
        try:
            trainer.fit()
        except Exception as err:  # Ray wraps the worker's exception in its own
            line, code = _failure_line(err)
            print(line, file=sys.stderr)
            return code
    finally:
        if started_here:
            ray.shutdown()
    print(f"shoal: run directory {run_dir}", file=sys.stderr)
    return 0
