"""An sbatch script: one `srun` task per node, each running `shoal launch`.

The rendezvous is on the job's first node, as `scontrol show hostnames` lists it, at the
address SLURM itself reaches that node by (its NodeAddr). `--signal=TERM@60` has SLURM send
SIGTERM to every task (each node's `shoal launch`) 60 s before the time limit, so the
workers stop with a checkpoint. Not `B:TERM`, to the batch shell: passed on to srun, a
SIGTERM makes srun end the step at once, and the tasks are killed without saving (seen on
Slurm 22.05, `tests/clusters/test_slurm.py`). The shell itself outlives a SIGTERM (a
preemption signals every process of the job) and waits for srun.
"""

from __future__ import annotations


from shoal.launch.render.common import job_name, node_command

SCRIPT = """#!/bin/bash
#SBATCH --job-name={name}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task={cpus}
{gpu_line}#SBATCH --signal=TERM@60
#SBATCH --output={name}-%j.out
{extra_lines}# Rendered by `shoal render slurm`. Submitted again, it continues the run from its newest
# checkpoint (after a preemption, a time limit, scancel).
set -euo pipefail

config="${{SLURM_SUBMIT_DIR:-$PWD}}/{name}-${{SLURM_JOB_ID}}.toml"
cat > "$config" <<'SHOAL_CONFIG'
{toml}SHOAL_CONFIG

head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
head_addr=$(scontrol show node "$head_node" | sed -n 's/.*NodeAddr=\\([^ ]*\\).*/\\1/p')
export SHOAL_RDZV="${{head_addr:-$head_node}}:{port}" SHOAL_CONFIG="$(cat "$config")"

# Each task reads its own SLURM_NODEID, hence the single quotes. srun runs in the background so
# that a SIGTERM to this shell does not end the job before the tasks have saved their checkpoint.
srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c '{node_command} \\
  --nnodes "$SLURM_NNODES" --node-rank "$SLURM_NODEID" --rdzv "$SHOAL_RDZV" --run-id "shoal-$SLURM_JOB_ID"' &
srun_pid=$!
trap 'echo "shoal: SIGTERM: the workers stop at a step boundary with a checkpoint" >&2' TERM
set +e
wait "$srun_pid"; status=$?
while [ "$status" -gt 128 ] && kill -0 "$srun_pid" 2>/dev/null; do  # woken by the trap: wait for the end
  wait "$srun_pid"; status=$?
done
exit "$status"
"""


def render_sbatch(cfg, toml: str, *, nodes: int, gpus: int, port: int, time: str = "", partition: str = "") -> str:
    extra = "".join(f"#SBATCH --{key}={value}\n" for key, value in (("time", time), ("partition", partition))
                    if value)
    return SCRIPT.format(name=job_name(cfg), nodes=nodes, cpus=max(cfg.launch.nproc, cfg.launch.threads * cfg.launch.nproc),
                         gpu_line=f"#SBATCH --gpus-per-node={gpus}\n" if gpus else "", extra_lines=extra,
                         toml=toml if toml.endswith("\n") else toml + "\n", port=port,
                         node_command=node_command(cfg).replace("'", "'\\''"))
