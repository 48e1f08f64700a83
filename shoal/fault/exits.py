"""How a replica of a fault-tolerant job stops: one context manager around its training.

Each way out of a replica's training has its own exit, which the launcher reads
(shoal/runtime/protocol.py): a lost membership store stops with a checkpoint (STORE_LOST_EXIT);
a replica group that lost a worker, or a job the coordinator ended, exits 1 for the launcher to
restart or end it; a stop signal (or a coordinator's agreed stop) saves on the master and exits
with the preemption code.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from shoal.fault.elastic import Replicas
from shoal.fault.errors import GroupBroken, JobStopped, StoreLost
from shoal.runtime import preempt
from shoal.runtime.protocol import STORE_LOST_EXIT, preempted_exit_code

log = logging.getLogger("shoal")


@contextmanager
def replica_exits(replicas: Replicas) -> Iterator[None]:
    """Turn the ways a replica's training stops into its exit code, saving first where one must."""
    host = replicas.host
    try:
        yield
    except StoreLost as err:  # the launcher (and its membership store) is gone: stop with a checkpoint
        replicas.rollback()
        # The lanes of a replica group agree on the loss and stop at the same point of the step
        # (GradientAverage.reduce, Joiner.join), so the master group's lanes save together here.
        saving = replicas.is_master
        log.error("%s; stopping%s; continue with --resume", err,
                  f" with a checkpoint at step {host.step}" if saving else "")
        if saving:
            host.save_checkpoint()
        host.finish_saves()
        raise SystemExit(STORE_LOST_EXIT) from None
    except GroupBroken as err:  # a peer of this replica group died: the launcher restarts the whole group
        log.error("%s; exiting for the launcher to restart the group", err)
        raise SystemExit(1) from None
    except JobStopped as err:  # the coordinator ended the job; it says why
        log.error("stopped: %s", err)
        raise SystemExit(1) from None
    except preempt.Preempted as stopped:
        # The coordinator stopped every replica after the same step; its master saves now.
        if stopped.save and replicas.is_master:
            host.save_checkpoint()
            host.finish_saves()
        log.warning("%s; %s", stopped, "checkpoint saved; continue with --resume" if stopped.save else
                    "left the job, which goes on without this worker")
        raise SystemExit(preempted_exit_code(stopped.signum)) from None
