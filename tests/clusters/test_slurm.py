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
from tests.conftest import free_port, wait_for

pytestmark = pytest.mark.e2e

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


def test_rendered_sbatch_script_trains_on_two_slurm_nodes(tmp_path, slurm_cluster, reference_losses, capsys):
    script = tmp_path / "job.sbatch"
    assert cli.main(["render", "slurm", "--nodes", "2", "--port", str(free_port()), "-o", str(script), *RUN,
                     "launch.nproc=1", "log.name=slurm"]) == 0
    job = subprocess.run(["sbatch", "--wait", str(script)], cwd=tmp_path, env=node_env(SLURM_CONF=str(slurm_cluster)),
                         capture_output=True, text=True, timeout=300)
    outputs = "\n".join(p.read_text() for p in tmp_path.glob("*.out"))
    assert job.returncode == 0, job.stderr + outputs
    run = tmp_path / "runs" / "slurm"
    assert all("world 2 on cpu" in (run / "logs" / f"rank{r}.log").read_text() for r in range(2))
    assert train_losses(run) == pytest.approx(reference_losses, rel=1e-6)
    assert (run / "checkpoints" / "step_00000003" / "meta.json").is_file()
