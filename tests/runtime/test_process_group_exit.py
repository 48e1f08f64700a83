"""A Shoal worker's process group and its Gloo threads end at `end_distributed`, while the worker
still runs: after the first optimizer step too (it imports torch._dynamo, and with it
torch.distributed.nn.functional: shoal/runtime/before_init.py), with a DDP model alive (its
Reducer holds the group), and after FSDP on a DeviceMesh (which DTensor's caches keep). Left to
the interpreter's exit, a group can abort the process, or hang it when freed from C++ with the
GIL held (docs/torch.md)."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = r"""
import os, sys
import torch
import torch.distributed as dist
from shoal.runtime.env import end_distributed, init_distributed, pick_device, read_env

def threads():
    return len(os.listdir("/proc/self/task"))

before = threads()
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                  MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
init_distributed(read_env(os.environ), pick_device("cpu", 0))
running = threads()
if sys.argv[2] == "ddp":
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 3))
else:  # FSDP2 on a mesh: DTensor's caches keep the mesh, and the mesh its groups, for good
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    model = fully_shard(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)),
                        mesh=init_device_mesh("cpu", (1,), mesh_dim_names=("dp",)))
model(torch.ones(2, 3)).sum().backward()
torch.optim.AdamW(model.parameters()).step()  # imports torch._dynamo
dist.all_reduce(torch.ones(3))
if sys.argv[2] == "ddp":
    end_distributed(model)
    model.process_group = None  # now no C++ object holds the group: this Python reference was the last
else:
    end_distributed()
    del model  # FSDP's state holds its groups until the model goes
    import gc
    gc.collect()
# A joined thread's kernel task can outlive the join by a moment (a fresh-clone run once counted one
# more): wait for the count to settle, then name whatever is left.
import glob, time
deadline = time.monotonic() + 30
while threads() > before and time.monotonic() < deadline:
    time.sleep(0.05)
names = sorted(open(p).read().strip() for p in glob.glob("/proc/self/task/*/comm"))
print(before, running, threads(), ",".join(names))
"""


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["ddp", "fsdp"])
def test_the_gloo_group_and_its_threads_end_at_end_distributed(tmp_path, layout):
    from tests.conftest import free_port
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(free_port()), layout], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    before, running, after, names = out.stdout.split(maxsplit=3)
    before, running, after = int(before), int(running), int(after)
    assert running > before  # the group's worker threads (and its store's)
    # A group that outlives destroy keeps its threads; one of them can abort the interpreter's exit.
    assert after <= before, (before, running, after, names)
