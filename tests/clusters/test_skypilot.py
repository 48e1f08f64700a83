"""The SkyPilot task: SkyPilot's own schema accepts it (where `skypilot` is installed), and its
`run` script, given exactly SkyPilot's variables on two "nodes" of this machine, trains like
`shoal run`."""

import subprocess

import pytest
import yaml

from shoal import cli
from tests.clusters.conftest import RUN, node_env, train_losses
from tests.conftest import free_port


def render_task(capsys, *args: str) -> str:
    assert cli.main(["render", "skypilot", *args]) == 0
    return capsys.readouterr().out


def test_skypilot_accepts_the_task(capsys, tmp_path):
    sky = pytest.importorskip("sky", reason="SkyPilot's schema needs `pip install skypilot` (docs/clusters.md)")
    from sky.utils import common_utils, schemas
    path = tmp_path / "task.yaml"
    path.write_text(render_task(capsys, "--nodes", "2", "--gpus-per-node", "8", "--accelerator", "H100", *RUN,
                                "train.batch_size=64"))
    common_utils.validate_schema(yaml.safe_load(path.read_text()), schemas.get_task_schema(), "invalid task: ")
    task = sky.Task.from_yaml(str(path))
    assert task.num_nodes == 2 and "SHOAL_CONFIG" in task.envs


@pytest.mark.e2e
def test_task_run_script_trains_from_skypilot_variables(capsys, tmp_path, reference_losses):
    task = yaml.safe_load(render_task(capsys, "--nodes", "2", "--port", str(free_port()), *RUN, "launch.nproc=1",
                                      "log.name=sky"))
    nodes = []
    for node_rank in range(2):
        env = node_env(**task["envs"], SKYPILOT_NODE_RANK=str(node_rank), SKYPILOT_NUM_NODES="2",
                       SKYPILOT_NODE_IPS="127.0.0.1\n127.0.0.1\n")
        nodes.append(subprocess.Popen(["bash", "-c", task["run"]], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [node.communicate(timeout=240)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    run = tmp_path / "runs" / "sky"
    assert "world 2 on cpu" in (run / "logs" / "rank1.log").read_text()
    assert train_losses(run) == pytest.approx(reference_losses, rel=1e-6)
