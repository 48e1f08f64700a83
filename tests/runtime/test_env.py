"""Who am I: the mesh degrees, the launchers' environments, the thread budget."""

import os

import pytest

from shoal import config
from shoal.config import ConfigError
from shoal.runtime.env import _first_slurm_host, read_env, thread_budget
from shoal.runtime.mesh import ParallelDims
from shoal.runtime.protocol import LAUNCHER_PID_ENV, LOCAL_WORKERS_ENV


def test_parallel_dims_fill_and_refuse():
    dims = ParallelDims.from_config(config.load(None, ["parallel.tp=2"]).parallel, 8)
    assert (dims.dp_replicate, dims.dp_shard, dims.tp, dims.dp) == (4, 1, 2, 4)
    dims = ParallelDims.from_config(config.load(None, ["parallel.dp_shard=-1"]).parallel, 4)
    assert (dims.dp_replicate, dims.dp_shard) == (1, 4)
    with pytest.raises(ConfigError, match="multiply to 6, but the world has 4"):
        ParallelDims.from_config(config.load(None, ["parallel.dp_replicate=3", "parallel.tp=2"]).parallel, 4)
    with pytest.raises(ConfigError, match="does not split"):
        ParallelDims.from_config(config.load(None, ["parallel.tp=3"]).parallel, 4)


def test_env_from_torchrun_and_slurm():
    env = read_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                    "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234", "TORCHELASTIC_RESTART_COUNT": "2",
                    "TORCHELASTIC_USE_AGENT_STORE": "True"})
    assert (env.rank, env.world_size, env.local_rank, env.restart_count, env.agent_hosts_store) == (3, 4, 1, 2, True)
    env = read_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "77",
                    "SLURM_NTASKS_PER_NODE": "4(x2)", "SLURM_JOB_NODELIST": "gpu[03-04]"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (5, 8, 1, 4)
    assert (env.master_addr, env.master_port, env.agent_hosts_store) == ("gpu03", 20077, False)
    assert _first_slurm_host("node7,node9") == "node7"
    assert _first_slurm_host("a[1,3-5]") == "a1"


@pytest.mark.parametrize("env, workers", [
    ({}, 1),  # a single process takes every core
    ({"LOCAL_WORLD_SIZE": "2"}, 2),  # torchrun, shoal run
    ({LOCAL_WORKERS_ENV: "4", "LOCAL_WORLD_SIZE": "2"}, 4),  # a fault-tolerant launcher's workers
    ({"SLURM_NTASKS_PER_NODE": "2(x3)"}, 2),  # srun: 2 tasks on each of 3 nodes
])
def test_thread_budget_shares_the_cores_among_the_workers_of_a_host(env, workers):
    cores = len(os.sched_getaffinity(0))
    assert thread_budget(0, env) == max(1, cores // workers)
    assert thread_budget(3, env) == 3  # launch.threads wins
    assert thread_budget(0, {"SLURM_CPUS_PER_TASK": "5", **env}) == 5  # SLURM says outright
    # each data-loader process takes a core out of the worker's share, never the last one
    assert thread_budget(0, env, loader_workers=1) == max(1, cores // workers - 1)
    assert thread_budget(0, {"SLURM_CPUS_PER_TASK": "5", **env}, loader_workers=2) == 3
    assert thread_budget(0, env, loader_workers=cores) == 1


def test_a_launcher_environment_is_given_back(monkeypatch):
    """A process that launched workers (an API caller, a test) must not pass SHOAL_LAUNCHER_PID on
    to a job it starts later: that job's workers would exit at once, their parent not being it."""
    from shoal.runtime.env import launcher_environment
    monkeypatch.setenv("TORCHELASTIC_SIGNALS_TO_HANDLE", "SIGTERM")
    monkeypatch.delenv(LAUNCHER_PID_ENV, raising=False)
    with launcher_environment(**{LAUNCHER_PID_ENV: "123", "TORCHELASTIC_SIGNALS_TO_HANDLE": "SIGTERM,SIGUSR1"}):
        assert os.environ[LAUNCHER_PID_ENV] == "123"
    assert LAUNCHER_PID_ENV not in os.environ and os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] == "SIGTERM"
