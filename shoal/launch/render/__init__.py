"""`shoal render k8s|slurm|skypilot CONFIG`: the files a cluster needs to run `shoal launch`.

Each target writes one self-contained file (a Kubeflow TrainJob or PyTorchJob manifest, an
sbatch script, a SkyPilot task) that carries the resolved config, so what was rendered is
what runs. In every one, each node runs `shoal launch`, which finds its place from the
cluster's variables (shoal/runtime/env.py). The layout (nodes x workers per node) is checked
against the config's parallel degrees and batch before anything is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# The rendezvous port on node rank 0 where the cluster does not choose one (SLURM, SkyPilot).
DEFAULT_PORT = 29400


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("render", help="write a Kubernetes, SLURM or SkyPilot job that runs shoal launch",
                              description="Write a job file for a cluster: every node runs `shoal launch` with "
                                          "this config, reading its place from the cluster's variables. See "
                                          "docs/clusters.md.")
    targets = p.add_subparsers(dest="target", required=True, metavar="TARGET")
    k8s = targets.add_parser("k8s", help="a Kubeflow Trainer TrainJob (or a PyTorchJob)")
    _common(k8s, nodes_required=True)
    k8s.add_argument("--image", required=True, help="container image with Shoal installed")
    k8s.add_argument("--variant", choices=("trainjob", "pytorchjob"), default="trainjob",
                     help="TrainJob (trainer.kubeflow.org/v1alpha1, default) or PyTorchJob (kubeflow.org/v1)")
    k8s.add_argument("--runtime", default="torch-distributed", help="the TrainJob's ClusterTrainingRuntime")
    k8s.add_argument("--pvc", help="PersistentVolumeClaim every pod mounts at /shoal for the run directory "
                                   "(PyTorchJob; for a TrainJob the runtime mounts the shared volume)")
    slurm = targets.add_parser("slurm", help="an sbatch script: one srun task per node")
    _common(slurm, nodes_required=True)
    slurm.add_argument("--time", default="", help="the job's time limit, e.g. 24:00:00 (default: the partition's)")
    slurm.add_argument("--partition", default="", help="SLURM partition (default: the cluster's default)")
    sky = targets.add_parser("skypilot", help="a SkyPilot task YAML")
    _common(sky, nodes_required=False)
    sky.add_argument("--accelerator", default="", help="SkyPilot accelerator name with --gpus-per-node, e.g. A100")
    p.set_defaults(func=run)


def _common(p: argparse.ArgumentParser, *, nodes_required: bool) -> None:
    p.add_argument("items", nargs="*", metavar="[CONFIG.toml] [section.key=value ...]",
                   help="config file (default: the quickstart) and overrides, as for `shoal run`")
    p.add_argument("--nodes", type=int, required=nodes_required, default=2, help="nodes (hosts) in the job")
    p.add_argument("--gpus-per-node", type=int, default=0,
                   help="GPUs per node, one worker each; 0 means CPU nodes with launch.nproc workers each")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="rendezvous port on node rank 0")
    p.add_argument("--log-dir", help="log.dir on the nodes: a filesystem every node shares (checkpoints)")
    p.add_argument("-o", "--output", help="file to write (default: standard output)")


def resolve_layout(args: argparse.Namespace):
    """The config as the nodes will run it, checked against nodes x workers per node."""
    from shoal.config import ConfigError
    from shoal.launch.run import check_before_launch, load_config

    if args.nodes < 1:
        raise ConfigError(f"--nodes {args.nodes} must be at least 1")
    if args.gpus_per_node < 0:
        raise ConfigError(f"--gpus-per-node {args.gpus_per_node} must be 0 (CPU nodes) or more")
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port} must be from 1 to 65535")
    extra = [f"launch.nproc={args.gpus_per_node}", "launch.device=cuda"] if args.gpus_per_node else []
    if args.log_dir:
        extra.append(f"log.dir={args.log_dir}")
    cfg, _ = load_config(args.items, extra)
    world = args.nodes * cfg.launch.nproc
    unit = "GPUs" if args.gpus_per_node else "workers"
    try:
        check_before_launch(cfg, world)
    except ConfigError as err:
        raise ConfigError(f"{args.nodes} nodes x {cfg.launch.nproc} {unit} = {world} workers do not fit the "
                          f"config: {err}") from None
    return cfg


def run(args: argparse.Namespace) -> int:
    from shoal import config as config_module

    cfg = resolve_layout(args)
    toml = config_module.to_toml(cfg)
    if args.target == "k8s":
        from shoal.launch.render.k8s import render_pytorchjob, render_trainjob
        text = (render_trainjob(cfg, toml, nodes=args.nodes, image=args.image, gpus=args.gpus_per_node,
                                runtime=args.runtime) if args.variant == "trainjob" else
                render_pytorchjob(cfg, toml, nodes=args.nodes, image=args.image, gpus=args.gpus_per_node,
                                  pvc=args.pvc))
    elif args.target == "slurm":
        from shoal.launch.render.slurm import render_sbatch
        text = render_sbatch(cfg, toml, nodes=args.nodes, gpus=args.gpus_per_node, port=args.port,
                             time=args.time, partition=args.partition)
    else:
        from shoal.launch.render.skypilot import render_task
        text = render_task(cfg, toml, nodes=args.nodes, gpus=args.gpus_per_node, port=args.port,
                           accelerator=args.accelerator)
    if args.output:
        Path(args.output).write_text(text)
        print(f"shoal: wrote {args.output} ({args.nodes} nodes x {cfg.launch.nproc} workers)", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
