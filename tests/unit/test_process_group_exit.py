"""destroy_process_group frees the Gloo group in a Shoal worker, even after the first optimizer step
(which imports torch._dynamo, and with it torch.distributed.nn.functional: shoal/runtime/before_init.py)."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = r"""
import os, sys
import torch
import torch.distributed as dist
from shoal.runtime.env import init_distributed, pick_device, read_env

def threads():
    return len(os.listdir("/proc/self/task"))

before = threads()
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                  MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
init_distributed(read_env(os.environ), pick_device("cpu", 0))
running = threads()
param = torch.nn.Parameter(torch.ones(3))
param.grad = torch.ones(3)
torch.optim.AdamW([param]).step()  # imports torch._dynamo
dist.all_reduce(param.detach())
dist.destroy_process_group()
print(before, running, threads())
"""


def test_the_gloo_group_and_its_threads_end_at_destroy(tmp_path):
    from tests.conftest import free_port
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(free_port())], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    before, running, after = map(int, out.stdout.split())
    assert running > before  # the group's worker threads (and its store's)
    # A group that outlives destroy keeps its threads; one of them can abort the interpreter's exit.
    assert after <= before, (before, running, after)
