"""A real SLURM cluster on this machine (slurmctld and two slurmd, as root) runs the sbatch
script that `shoal render slurm` writes; the job trains like `shoal run`."""

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from shoal import cli
from tests.clusters.conftest import RUN, node_env, train_losses
from tests.conftest import TINY, free_port, metric_records, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.machine]

DAEMONS = ("slurmctld", "slurmd", "munged", "sbatch", "scontrol", "sinfo")
SLURM_CONF = """ClusterName=shoaltest
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SlurmUser=root
SlurmdUser=root
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd-%n.pid
SlurmdSpoolDir={dir}/spool-%n
StateSaveLocation={dir}/state
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd-%n.log
ReturnToService=2
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=node1 NodeHostname=localhost NodeAddr=127.0.0.1 Port={node1_port} CPUs=2
NodeName=node2 NodeHostname=localhost NodeAddr=127.0.0.1 Port={node2_port} CPUs=2
PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP
"""


def _munge_answers() -> bool:
    token = subprocess.run(["munge", "-n"], capture_output=True)
    return token.returncode == 0 and subprocess.run(["unmunge"], input=token.stdout,
                                                     capture_output=True).returncode == 0


@pytest.fixture
def slurm_cluster(tmp_path_factory):
    """SLURM_CONF of a running two-node cluster (node1, node2: both this machine)."""
    missing = [name for name in DAEMONS if shutil.which(name) is None]
    if missing:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} missing): apt-get install -y slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("a test SLURM cluster runs its daemons as root")
    state = tmp_path_factory.mktemp("slurm")
    os.chmod(state, 0o755)
    conf = state / "slurm.conf"
    conf.write_text(SLURM_CONF.format(dir=state, ctld_port=free_port(), node1_port=free_port(),
                                      node2_port=free_port()))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    started_munge = False
    if not _munge_answers():
        Path("/run/munge").mkdir(exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True)
        started_munge = True
        wait_for(_munge_answers, 30, "munged to answer")
    try:
        subprocess.run(["slurmctld"], env=env, check=True)
        for node in ("node1", "node2"):
            subprocess.run(["slurmd", "-N", node], env=env, check=True)
        wait_for(lambda: subprocess.run(["sinfo", "-h", "-o", "%t %D"], env=env, capture_output=True,
                                        text=True).stdout.split() == ["idle", "2"], 60, "two idle SLURM nodes")
        yield conf
    finally:
        for pidfile in state.glob("*.pid"):
            try:
                os.kill(int(pidfile.read_text()), signal.SIGTERM)
            except (ValueError, ProcessLookupError):
                pass
        if started_munge:
            os.kill(int(Path("/run/munge/munged.pid").read_text()), signal.SIGTERM)


def submit(script: Path, env: dict) -> str:
    """sbatch SCRIPT from its folder; the job's id."""
    return subprocess.run(["sbatch", "--parsable", str(script)], cwd=script.parent, env=env, capture_output=True,
                          text=True, check=True).stdout.strip().split(";")[0]


def finished(job_id: str, env: dict, timeout: float = 300) -> str:
    """Wait for the job to leave the queue (polled: `sbatch --wait` looks only every few seconds);
    its final state, as `COMPLETED` or `FAILED`."""
    wait_for(lambda: job_id not in subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True,
                                                  text=True).stdout.split(), timeout, f"SLURM job {job_id} to end")
    info = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
    return info.split("JobState=", 1)[1].split()[0]


def test_rendered_sbatch_script_trains_on_two_slurm_nodes(tmp_path, slurm_cluster, reference_losses, capsys):
    script = tmp_path / "job.sbatch"
    assert cli.main(["render", "slurm", "--nodes", "2", "--port", str(free_port()), "-o", str(script), *RUN,
                     "launch.nproc=1", "log.name=slurm"]) == 0
    env = node_env(SLURM_CONF=str(slurm_cluster))
    state = finished(submit(script, env), env)
    outputs = "\n".join(p.read_text() for p in tmp_path.glob("*.out"))
    assert state == "COMPLETED", outputs
    run = tmp_path / "runs" / "slurm"
    assert all("world 2 on cpu" in (run / "logs" / f"rank{r}.log").read_text() for r in range(2))
    assert train_losses(run) == pytest.approx(reference_losses, rel=1e-6)
    assert (run / "checkpoints" / "step_00000003" / "meta.json").is_file()


def test_a_slurm_job_signalled_like_a_preemption_stops_with_a_checkpoint_and_continues(tmp_path, slurm_cluster):
    """SIGTERM to the job's tasks, as the script's `--signal=TERM@60` has SLURM send before the time
    limit: every node's workers stop at one step with a checkpoint; the job submitted again
    continues from it."""
    env = node_env(SLURM_CONF=str(slurm_cluster))
    port = str(free_port())
    first = tmp_path / "first.sbatch"
    assert cli.main(["render", "slurm", "--nodes", "2", "--port", port, "-o", str(first), *TINY,
                     "train.steps=100000", "launch.nproc=1", "log.name=preempted", "log.tensorboard=false"]) == 0
    job_id = submit(first, env)
    run = tmp_path / "runs" / "preempted"
    metrics = run / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and metrics.read_text().count('"kind": "train"') >= 2, 180,
             "two training steps in the SLURM job")
    subprocess.run(["scancel", "--signal=TERM", job_id], env=env, check=True)
    finished(job_id, env)
    output = "\n".join(p.read_text() for p in tmp_path.glob("*.out"))
    assert "stopped by SIGTERM" in output, output[-3000:]
    steps = [r["step"] for r in metric_records(run, "train")]
    stopped = steps[-1]
    assert steps == list(range(1, stopped + 1)) and stopped < 100000
    assert (run / "checkpoints" / f"step_{stopped:08d}" / "meta.json").is_file()

    # The same run and port, two more steps: it resumes by itself, on a port the first job's
    # connections have just left.
    again = tmp_path / "again.sbatch"
    assert cli.main(["render", "slurm", "--nodes", "2", "--port", port, "-o", str(again), *TINY,
                     f"train.steps={stopped + 2}", "launch.nproc=1", "log.name=preempted",
                     "log.tensorboard=false"]) == 0
    state = finished(submit(again, env), env)
    output = "\n".join(p.read_text() for p in tmp_path.glob("*.out"))
    assert state == "COMPLETED", output[-3000:]
    steps = [r["step"] for r in metric_records(run, "train")]
    assert steps == list(range(1, stopped + 3))  # every step once: nothing repeated, nothing lost
