"""`shoal render`: manifests that the Kubernetes object schema accepts, an sbatch script and a
SkyPilot task that carry the resolved config, and a one-line error for a layout that does not fit."""

import shutil
import subprocess

import pytest
import yaml

from shoal import cli
from shoal import config as config_module
from tests.conftest import TINY

kubernetes = pytest.importorskip("kubernetes")


def render(capsys, *args: str) -> str:
    assert cli.main(["render", *args]) == 0
    return capsys.readouterr().out


def as_model(data: dict, kind: str):
    """Load `data` into the kubernetes client's model `kind` (which checks required fields) and
    check that nothing was dropped on the way: an unknown or misspelt field would be."""
    api = kubernetes.client.ApiClient()
    model = api._ApiClient__deserialize(data, kind)
    assert api.sanitize_for_serialization(model) == data
    return model


def embedded_config(text: str, tmp_path) -> config_module.Config:
    path = tmp_path / "embedded.toml"
    path.write_text(text)
    return config_module.load(str(path), [])


def test_trainjob_is_a_valid_kubeflow_trainer_object(capsys, tmp_path):
    doc = yaml.safe_load(render(capsys, "k8s", "--nodes", "3", "--image", "registry.example/shoal:1",
                                "--gpus-per-node", "4", *TINY, "train.batch_size=96"))
    assert (doc["apiVersion"], doc["kind"]) == ("trainer.kubeflow.org/v1alpha1", "TrainJob")
    assert set(doc) == {"apiVersion", "kind", "metadata", "spec"} and set(doc["spec"]) == {"runtimeRef", "trainer"}
    as_model(doc["metadata"], "V1ObjectMeta")
    assert doc["spec"]["runtimeRef"] == {"name": "torch-distributed"}
    trainer = doc["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (3, 4)
    # The trainer's fields are a container's (the runtime names it); resourcesPerNode is a ResourceRequirements.
    container = as_model({"name": "node", **{k: trainer[k] for k in ("image", "command", "env")}}, "V1Container")
    as_model(trainer["resourcesPerNode"], "V1ResourceRequirements")
    assert trainer["resourcesPerNode"]["limits"] == {"nvidia.com/gpu": "4"}
    assert container.command[:2] == ["sh", "-c"] and "exec shoal launch" in container.command[2]
    cfg = embedded_config(container.env[0].value, tmp_path)
    assert (cfg.launch.nproc, cfg.launch.device, cfg.data.seq_len) == (4, "cuda", 32)


def test_pytorchjob_pod_templates_are_valid_pods(capsys):
    doc = yaml.safe_load(render(capsys, "k8s", "--variant", "pytorchjob", "--nodes", "3", "--image", "img:1",
                                "--pvc", "shared-runs", *TINY, "train.batch_size=96", "log.dir=/shoal/runs"))
    assert (doc["apiVersion"], doc["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    assert doc["spec"]["nprocPerNode"] == "2"
    replicas = doc["spec"]["pytorchReplicaSpecs"]
    assert {k: v["replicas"] for k, v in replicas.items()} == {"Master": 1, "Worker": 2}
    for spec in replicas.values():
        pod = as_model(spec["template"], "V1PodTemplateSpec")
        container = pod.spec.containers[0]
        assert container.name == "pytorch"  # the operator injects PET_* into the container of this name
        assert container.ports[0].name == "pytorchjob-port"
        assert pod.spec.volumes[0].persistent_volume_claim.claim_name == "shared-runs"
        assert container.volume_mounts[0].mount_path == "/shoal"


@pytest.mark.slow
def test_sbatch_script_runs_one_launch_per_node(capsys, tmp_path):
    script = render(capsys, "slurm", "--nodes", "4", "--gpus-per-node", "8", "--time", "2:00:00", *TINY,
                    "train.batch_size=64")
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --signal=TERM@60", "#SBATCH --time=2:00:00"):
        assert line in script.splitlines()
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in script
    assert '--node-rank "$SLURM_NODEID"' in script
    if shutil.which("bash"):
        assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    toml = script.split("<<'SHOAL_CONFIG'\n", 1)[1].split("SHOAL_CONFIG\n", 1)[0]
    assert embedded_config(toml, tmp_path).launch.nproc == 8


def test_skypilot_task_reads_skypilot_variables(capsys, tmp_path):
    task = yaml.safe_load(render(capsys, "skypilot", "--nodes", "2", "--gpus-per-node", "8", "--accelerator", "H100",
                                 *TINY, "train.batch_size=64"))
    assert task["num_nodes"] == 2 and task["resources"] == {"accelerators": "H100:8"}
    for name in ("SKYPILOT_NODE_RANK", "SKYPILOT_NODE_IPS", "SKYPILOT_NUM_NODES"):
        assert f"${name}" in task["run"]
    assert embedded_config(task["envs"]["SHOAL_CONFIG"], tmp_path).launch.nproc == 8


@pytest.mark.parametrize("target", [["k8s", "--image", "img"], ["slurm"], ["skypilot", "--accelerator", "A100"]])
def test_a_layout_that_does_not_fit_is_one_line(capsys, target):
    assert cli.main(["render", *target, "--nodes", "2", "--gpus-per-node", "2", *TINY, "parallel.tp=8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("shoal: error: 2 nodes x 2 GPUs = 4 workers do not fit the config:")


@pytest.mark.slow
def test_a_node_resumes_once_the_run_has_a_checkpoint(tmp_path):
    """A pod restarted after preemption (or a job submitted again) must continue, not stop on
    'already holds checkpoints': the node command adds --resume when a complete one exists."""
    from shoal.launch.render.common import node_command
    fake = tmp_path / "bin" / "shoal"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho "$@"\n')
    fake.chmod(0o755)
    cfg = config_module.load(None, ["log.name=job"])
    env = {"PATH": f"{fake.parent}:/usr/bin:/bin", "SHOAL_CONFIG": config_module.to_toml(cfg)}

    def node_args() -> list[str]:
        out = subprocess.run(["sh", "-c", node_command(cfg)], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return out.stdout.split()

    assert node_args()[0] == "launch" and "--resume" not in node_args()
    (tmp_path / "runs" / "job" / "checkpoints" / "step_00000010").mkdir(parents=True)
    assert "--resume" not in node_args()  # an unfinished checkpoint has no meta.json yet
    (tmp_path / "runs" / "job" / "checkpoints" / "step_00000010" / "meta.json").write_text("{}")
    assert node_args()[-1] == "--resume"
