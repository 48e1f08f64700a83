"""A node's place from Kubeflow's PET_* and SkyPilot's SKYPILOT_* variables; an adopted process group."""

import pytest
import torch.distributed as dist

from shoal import cli
from shoal.config import ConfigError
from shoal.runtime.env import PET_VARIABLES, init_distributed, node_place, pick_device, read_env

TRAINJOB = {"PET_NNODES": "2", "PET_NPROC_PER_NODE": "3", "PET_NODE_RANK": "1",
            "PET_MASTER_ADDR": "job-node-0-0.job", "PET_MASTER_PORT": "29400"}


def test_a_trainjob_pod_gives_launch_its_place():
    place = node_place(TRAINJOB)
    assert (place.nnodes, place.node_rank, place.rdzv, place.nproc) == (2, 1, "job-node-0-0.job:29400", 3)


@pytest.mark.parametrize("missing", PET_VARIABLES)
def test_a_trainjob_env_missing_one_variable_names_it(missing):
    env = {k: v for k, v in TRAINJOB.items() if k != missing}
    with pytest.raises(ConfigError, match=f"^{missing} is not set"):
        node_place(env)


def test_torchrun_style_nproc_keeps_the_config():
    assert node_place({**TRAINJOB, "PET_NPROC_PER_NODE": "auto"}).nproc is None


def test_skypilot_variables_give_the_head_as_rendezvous():
    env = {"SKYPILOT_NODE_RANK": "0", "SKYPILOT_NUM_NODES": "2", "SKYPILOT_NODE_IPS": "10.0.0.5\n10.0.0.6\n"}
    place = node_place(env)
    assert (place.nnodes, place.node_rank, place.rdzv) == (2, 0, "10.0.0.5:29400")
    assert node_place({**env, "MASTER_PORT": "5000"}).rdzv == "10.0.0.5:5000"
    with pytest.raises(ConfigError, match="SKYPILOT_NODE_IPS is not set"):
        node_place({"SKYPILOT_NODE_RANK": "0", "SKYPILOT_NUM_NODES": "2"})


def test_one_worker_per_pod_reads_pet_variables():
    worker = read_env({**TRAINJOB, "PET_NPROC_PER_NODE": "1"})
    assert (worker.rank, worker.world_size, worker.master_addr, worker.master_port) == (1, 2, "job-node-0-0.job",
                                                                                        29400)
    with pytest.raises(ConfigError, match="need a launcher"):
        read_env(TRAINJOB)


def test_launch_without_flags_or_variables_says_what_is_missing(capsys, monkeypatch):
    for name in [*PET_VARIABLES, "SKYPILOT_NODE_RANK"]:
        monkeypatch.delenv(name, raising=False)
    assert cli.main(["launch", "train.steps=1"]) == 2
    assert capsys.readouterr().err.strip() == ("shoal: error: shoal launch needs --nnodes, --node-rank, --rdzv (or "
                                               "the PET_* variables of a Kubeflow TrainJob, or SkyPilot's "
                                               "SKYPILOT_* variables)")
    monkeypatch.setenv("PET_NNODES", "2")
    assert cli.main(["launch", "train.steps=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("shoal: error: PET_NPROC_PER_NODE is not set, but PET_NNODES is")


def test_a_process_group_made_before_the_worker_is_adopted(tmp_path):
    """Ray Train initialises the group before calling the worker; the worker must use it as it is."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        group = dist.group.WORLD
        worker = read_env({})
        assert (worker.rank, worker.world_size) == (0, 1)
        init_distributed(worker, pick_device("cpu", 0))
        assert dist.group.WORLD is group
    finally:
        dist.destroy_process_group()
