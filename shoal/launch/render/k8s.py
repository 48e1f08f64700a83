"""Kubeflow manifests: a Trainer `TrainJob` (trainer.kubeflow.org/v1alpha1) or a `PyTorchJob`
(kubeflow.org/v1). Each pod runs `shoal launch`, which reads the variables the operator
injects: PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR, PET_MASTER_PORT.

The config travels in the SHOAL_CONFIG variable and is written to a file in the pod, so the
manifest needs no ConfigMap; the run directory (log.dir) must be a volume all pods share.
"""

from __future__ import annotations

from shoal.launch.render.common import dump_yaml, job_name, node_command as shell_command

# The PyTorchJob operator takes the master's port from the container port of this name.
PYTORCHJOB_PORT_NAME = "pytorchjob-port"
PYTORCHJOB_PORT = 23456
SHARED_MOUNT = "/shoal"


def node_command(cfg) -> list[str]:
    """The container's command; `shoal launch` finds the node's place in the PET_* variables."""
    return ["sh", "-c", shell_command(cfg)]


def _resources(gpus: int) -> dict:
    return {"limits": {"nvidia.com/gpu": str(gpus)}} if gpus else {}  # a Quantity is a string


def trainjob(cfg, toml: str, *, nodes: int, image: str, gpus: int, runtime: str) -> dict:
    trainer = {"image": image, "command": node_command(cfg), "numNodes": nodes,
               "numProcPerNode": cfg.launch.nproc, "env": [{"name": "SHOAL_CONFIG", "value": toml}]}
    if gpus:
        trainer["resourcesPerNode"] = _resources(gpus)
    return {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob",
            "metadata": {"name": job_name(cfg), "labels": {"app.kubernetes.io/managed-by": "shoal"}},
            "spec": {"runtimeRef": {"name": runtime}, "trainer": trainer}}


def pod_template(cfg, toml: str, *, image: str, gpus: int, pvc: str | None) -> dict:
    container = {"name": "pytorch", "image": image, "command": node_command(cfg),
                 "env": [{"name": "SHOAL_CONFIG", "value": toml}],
                 "ports": [{"name": PYTORCHJOB_PORT_NAME, "containerPort": PYTORCHJOB_PORT}]}
    if gpus:
        container["resources"] = _resources(gpus)
    spec: dict = {"containers": [container]}
    if pvc:
        container["volumeMounts"] = [{"name": "shoal-runs", "mountPath": SHARED_MOUNT}]
        spec["volumes"] = [{"name": "shoal-runs", "persistentVolumeClaim": {"claimName": pvc}}]
    return {"spec": spec}


def pytorchjob(cfg, toml: str, *, nodes: int, image: str, gpus: int, pvc: str | None) -> dict:
    template = pod_template(cfg, toml, image=image, gpus=gpus, pvc=pvc)
    replicas = {"Master": {"replicas": 1, "restartPolicy": "OnFailure", "template": template}}
    if nodes > 1:
        replicas["Worker"] = {"replicas": nodes - 1, "restartPolicy": "OnFailure", "template": template}
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
            "metadata": {"name": job_name(cfg), "labels": {"app.kubernetes.io/managed-by": "shoal"}},
            "spec": {"nprocPerNode": str(cfg.launch.nproc), "pytorchReplicaSpecs": replicas}}


def render_trainjob(cfg, toml: str, *, nodes: int, image: str, gpus: int, runtime: str) -> str:
    return dump_yaml(trainjob(cfg, toml, nodes=nodes, image=image, gpus=gpus, runtime=runtime))


def render_pytorchjob(cfg, toml: str, *, nodes: int, image: str, gpus: int, pvc: str | None) -> str:
    return dump_yaml(pytorchjob(cfg, toml, nodes=nodes, image=image, gpus=gpus, pvc=pvc))
