"""`shoal run --ray`: a real local Ray runtime runs the same 2 workers as `shoal run` (same losses),
Ray Train receives the step records, and bad input is one line."""

import json
import logging
import os
import sys

import pytest

from shoal import cli
from shoal import config as config_module
from shoal.launch.run import load_config
from shoal.observe import rundir
from tests.clusters.conftest import RUN, train_losses
from tests.conftest import free_port, metric_records

ray = pytest.importorskip("ray")
pytest.importorskip("ray.train.torch")

# A hang guard, not a pace. Beside two CPU burners this test took 18 minutes while Ray ran its
# workers at its default nice 15 (the burners took the cores); a local Ray now runs them at nice 0.
pytestmark = [pytest.mark.distributed, pytest.mark.machine, pytest.mark.timeout(1500)]


class ReportLog(ray.train.UserCallback):
    """Writes what Ray Train received from each report (one dict per worker) to a JSONL file."""

    def __init__(self, path: str):
        self.path = path

    def after_report(self, run_context, metrics, checkpoint):
        with open(self.path, "a") as file:
            file.write(json.dumps(metrics) + "\n")


def niceness() -> int:
    return os.getpriority(os.PRIO_PROCESS, 0)


@pytest.fixture
def local_ray():
    """A Ray this test process joined first: `--ray` uses it rather than starting its own each run."""
    from shoal.launch.ray import connect
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    assert connect(None, num_cpus=2)
    # The local Ray's logging settings are for its actors: this (the caller's) process keeps its own.
    assert (root.level, root.handlers) == (level, handlers)
    yield
    ray.shutdown()


def test_ray_workers_train_like_shoal_run(tmp_path, reference_losses, local_ray):
    from shoal.launch.ray import run_on_ray
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the controller cannot import tests/
    # The config `shoal run` builds from the same arguments (the quickstart file under the overrides).
    cfg, _ = load_config([*RUN, "log.name=ray", "log.every=1", f"log.dir={tmp_path / 'runs'}"])
    run_dir = rundir.new_run_dir(cfg)
    (run_dir / "config.toml").write_text(config_module.to_toml(cfg))
    reported = tmp_path / "reported.jsonl"
    assert run_on_ray(cfg, run_dir, address=None, resume=False, callbacks=(ReportLog(str(reported)),)) == 0
    losses = train_losses(run_dir)
    assert losses == pytest.approx(reference_losses, rel=1e-6)
    reports = [json.loads(line) for line in reported.read_text().splitlines()]
    assert [[worker["loss"] for worker in report] for report in reports] == [[loss, loss] for loss in losses]
    assert (run_dir / "checkpoints" / "step_00000003" / "meta.json").is_file()  # what --resume continues from
    assert ray.is_initialized()  # the Ray joined before the run is still there for the next one
    # Its workers run at normal priority, not Ray's default nice 15 that lets any busy process starve them.
    assert ray.get(ray.remote(niceness).remote()) == 0
    # `shoal run --ray --resume`, two steps further: Ray's workers continue from that checkpoint.
    assert cli.main(["run", *RUN, "train.steps=5", "log.name=ray", f"log.dir={tmp_path / 'runs'}", "--ray",
                     "--resume"]) == 0
    steps = [r["step"] for r in metric_records(run_dir, "train")]
    assert steps == [1, 2, 3, 4, 5] and train_losses(run_dir)[:3] == losses
    assert "resumed from" in (run_dir / "logs" / "rank0.log").read_text()


def test_ray_address_that_does_not_answer_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    port = free_port()
    assert cli.main(["run", *RUN, "--ray", f"127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"shoal: error: --ray 127.0.0.1:{port}: no Ray cluster answers there")
    assert not (tmp_path / "runs").exists()  # checked before a run directory is made


def test_ray_not_installed_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if Ray were absent
    assert cli.main(["run", "--ray", *RUN]) == 2
    assert capsys.readouterr().err.strip() == ("shoal: error: --ray needs Ray Train, which is not installed: "
                                               "pip install 'shoal[ray]'")
