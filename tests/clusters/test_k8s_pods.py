"""Two network namespaces as the two pods of a TrainJob: each runs the rendered container
command with exactly the variables the Kubeflow torch runtime injects, and nothing else."""

import subprocess

import pytest
import yaml

from shoal import cli
from tests.clusters.conftest import RUN, node_env, train_losses
from tests.conftest import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.netns]


def test_trainjob_pods_train_like_shoal_run(tmp_path, two_hosts, reference_losses, capsys):
    assert cli.main(["render", "k8s", "--nodes", "2", "--image", "unused", *RUN, "launch.nproc=1",
                     "log.name=trainjob"]) == 0
    trainer = yaml.safe_load(capsys.readouterr().out)["spec"]["trainer"]
    config = next(e["value"] for e in trainer["env"] if e["name"] == "SHOAL_CONFIG")
    port = free_port()
    pods = []
    for node_rank, (host, link) in enumerate(two_hosts):
        env = node_env(SHOAL_CONFIG=config, PET_NNODES="2", PET_NPROC_PER_NODE=str(trainer["numProcPerNode"]),
                       PET_NODE_RANK=str(node_rank), PET_MASTER_ADDR="10.77.0.1", PET_MASTER_PORT=str(port),
                       GLOO_SOCKET_IFNAME=link)
        pods.append(subprocess.Popen(["ip", "netns", "exec", host, *trainer["command"]], cwd=tmp_path, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [pod.communicate(timeout=240)[0] for pod in pods]
    assert [pod.returncode for pod in pods] == [0, 0], outputs
    run = tmp_path / "runs" / "trainjob"  # the shared volume of the pods
    assert all("world 2 on cpu" in (run / "logs" / f"rank{r}.log").read_text() for r in range(2))
    assert train_losses(run) == pytest.approx(reference_losses, rel=1e-6)
    assert (run / "checkpoints" / "step_00000003" / "meta.json").is_file()
