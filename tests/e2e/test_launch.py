"""Multi-host launch: real rendezvous across two network namespaces, torchrun, SLURM variables."""

import os
import socket
import subprocess
import sys

import pytest

from tests.conftest import SHOAL, TINY, free_port, shoal, threads_for, torch_threads

pytestmark = pytest.mark.e2e


def test_launch_refuses_a_busy_port(tmp_path):
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = shoal("launch", "--nnodes", "2", "--node-rank", "0", "--rdzv", f"127.0.0.1:{port}", *TINY,
                    cwd=tmp_path, timeout=60)
    assert out.returncode == 2
    assert f"port {port} is already in use" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_launch_gives_up_on_a_silent_endpoint(tmp_path):
    port = free_port()
    out = shoal("launch", "--nnodes", "2", "--node-rank", "1", "--rdzv", f"127.0.0.1:{port}", *TINY,
                "launch.rdzv_timeout=2", cwd=tmp_path, timeout=60)
    assert out.returncode == 2
    assert "nobody answered within 2 s" in out.stderr


def test_plain_torchrun_runs_the_worker(tmp_path):
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "shoal.worker", *TINY, "train.steps=3"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    log = (tmp_path / "runs" / "shoal" / "logs" / "rank1.log").read_text()
    assert "world 2 on cpu" in log and "finished 3 steps" in log
    assert torch_threads(log) == [threads_for(2)]  # torchrun's LOCAL_WORLD_SIZE shares the cores


def test_slurm_variables_alone_start_a_job(tmp_path):
    port = free_port()
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank), SLURM_NTASKS_PER_NODE="2",
                   SLURM_JOB_NODELIST="localhost", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-m", "shoal.worker", *TINY, "train.steps=3"], cwd=tmp_path,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    log = (tmp_path / "runs" / "shoal" / "logs" / "rank1.log").read_text()
    assert "world 2 on cpu" in log
    assert torch_threads(log) == [threads_for(2)]  # SLURM_NTASKS_PER_NODE shares the cores


def test_two_hosts_join_one_job_through_rendezvous(tmp_path, two_hosts):
    port = free_port()
    procs = []
    for rank, (host, link) in enumerate(two_hosts):
        workdir = tmp_path  # a shared filesystem, as checkpoints across hosts need
        env = {**os.environ, "GLOO_SOCKET_IFNAME": link}
        procs.append(subprocess.Popen(
            ["ip", "netns", "exec", host, SHOAL, "launch", "--nnodes", "2", "--node-rank", str(rank),
             "--rdzv", f"10.77.0.1:{port}", *TINY, "launch.nproc=1", "train.steps=3"],
            cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    run = tmp_path / "runs" / "quickstart"
    texts = [(run / "logs" / f"rank{r}.log").read_text() for r in range(2)]
    assert all("world 2 on cpu" in t and "finished 3 steps" in t for t in texts)
    assert (run / "checkpoints" / "step_00000003" / "meta.json").is_file()
