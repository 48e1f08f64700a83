"""A SkyPilot task: `num_nodes` nodes, each running `shoal launch` with its place taken from
SkyPilot's variables: SKYPILOT_NODE_RANK, SKYPILOT_NUM_NODES and SKYPILOT_NODE_IPS (one
address a line, the head first, which hosts the rendezvous).

The config travels in the task's SHOAL_CONFIG variable. log.dir must be a bucket or volume
that every node mounts (`file_mounts` with mode MOUNT), as checkpoints need one place.
"""

from __future__ import annotations

from shoal.config import ConfigError
from shoal.launch.render.common import dump_yaml, job_name, node_command

FLAGS = """ \\
  --nnodes "$SKYPILOT_NUM_NODES" --node-rank "$SKYPILOT_NODE_RANK" \\
  --rdzv "$(echo "$SKYPILOT_NODE_IPS" | head -n 1):$SHOAL_RDZV_PORT"
"""


def task(cfg, toml: str, *, nodes: int, gpus: int, port: int, accelerator: str) -> dict:
    if gpus and not accelerator:
        raise ConfigError("--gpus-per-node needs --accelerator, SkyPilot's name for the GPU (e.g. A100, H100)")
    resources = {"accelerators": f"{accelerator}:{gpus}"} if gpus else {"cpus": f"{cfg.launch.nproc}+"}
    return {"name": job_name(cfg), "num_nodes": nodes, "resources": resources,
            "envs": {"SHOAL_CONFIG": toml, "SHOAL_RDZV_PORT": str(port)},
            "run": node_command(cfg) + FLAGS}


def render_task(cfg, toml: str, *, nodes: int, gpus: int, port: int, accelerator: str) -> str:
    return dump_yaml(task(cfg, toml, nodes=nodes, gpus=gpus, port=port, accelerator=accelerator))
