import os

import pytest
import torch
from torch import nn

from shoal import config
from shoal.config import ConfigError
from shoal.data.spec import DataSpec
from shoal.models import build_model, compute_loss
from shoal.runtime.env import _first_slurm_host, read_env, thread_budget
from shoal.runtime.mesh import ParallelDims

TOKENS = DataSpec(kind="tokens", vocab_size=256, seq_len=16)


def test_gpt_debug_flavour_predicts_every_position():
    model = build_model(config.load(None).model, TOKENS)
    logits = model(torch.randint(0, 256, (3, 16)))
    assert logits.shape == (3, 16, 256)
    # causal: changing the last token leaves earlier positions' outputs unchanged
    a = torch.randint(0, 256, (1, 16))
    b = a.clone()
    b[0, -1] = (b[0, -1] + 1) % 256
    assert torch.allclose(model(a)[0, :-1], model(b)[0, :-1], atol=1e-6)


def test_user_factory_is_called_with_the_data_spec(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(
        "import torch\n"
        "def build(spec):\n    return torch.nn.Linear(spec.in_features, spec.num_classes)\n"
        "def bad(spec):\n    return 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = DataSpec(kind="classes", in_features=5, num_classes=3)
    model = build_model(config.load(None, ["model.factory=my_models:build"]).model, spec)
    assert isinstance(model, nn.Linear) and model.out_features == 3
    with pytest.raises(ConfigError, match="returned int"):
        build_model(config.load(None, ["model.factory=my_models:bad"]).model, spec)
    with pytest.raises(ConfigError, match="cannot be imported"):
        build_model(config.load(None, ["model.factory=my_models:nope"]).model, spec)


def test_model_and_data_mismatch_is_explained():
    with pytest.raises(ConfigError, match="needs feature data"):
        build_model(config.load(None, ["model.name=mlp"]).model, TOKENS)


def test_loss_is_cross_entropy_for_labels_and_mse_for_floats():
    logits = torch.tensor([[2.0, 0.0]])
    assert torch.isclose(compute_loss(logits, torch.tensor([0])), torch.log1p(torch.exp(torch.tensor(-2.0))))
    assert torch.isclose(compute_loss(torch.tensor([[1.0]]), torch.tensor([3.0])), torch.tensor(4.0))


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
    ({"SHOAL_LOCAL_WORKERS": "4", "LOCAL_WORLD_SIZE": "2"}, 4),  # a fault-tolerant launcher's workers
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
    monkeypatch.delenv("SHOAL_LAUNCHER_PID", raising=False)
    with launcher_environment(SHOAL_LAUNCHER_PID="123", TORCHELASTIC_SIGNALS_TO_HANDLE="SIGTERM,SIGUSR1"):
        assert os.environ["SHOAL_LAUNCHER_PID"] == "123"
    assert "SHOAL_LAUNCHER_PID" not in os.environ and os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] == "SIGTERM"
