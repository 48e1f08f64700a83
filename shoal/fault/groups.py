"""The Gloo process groups of a fault-tolerant worker's successive generations.

Every generation gets a new `ProcessGroupGloo` on a PrefixStore of its own, all on one shared
Gloo device. A generation that is abandoned (a peer died or hung) keeps its group until the
collectives it gave up have ended, then the group is destroyed (shoal/fault/elastic.py calls
`reap` at every step boundary). Both halves were measured here: kept forever, a group whose
pair holds bytes for a collective this rank gave up busy-polls the device's event loop (half a
core for the rest of the run); destroyed at once, its destructor waits for the collective still
in flight, up to the step timeout. `pg.abort()` and `shutdown()` do not cancel a Gloo collective
in torch 2.13.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist

Collective = dist.Work | torch.futures.Future


def finished(work: Collective) -> bool:
    return work.is_completed() if isinstance(work, dist.Work) else work.done()


class GenerationGroups:
    """The current generation's group, and the abandoned ones not yet destroyed."""

    def __init__(self, timeout: timedelta):
        self.timeout = timeout
        self.pg: dist.ProcessGroup | None = None
        self.inflight: list[Collective] = []  # this generation's collectives not yet seen finished
        self.retiring: list[tuple[float, dist.ProcessGroup, list[Collective]]] = []
        self.device = None  # the Gloo device every generation's group shares (made at the first connect)

    def connect(self, store: dist.Store, prefix: str, rank: int, size: int) -> dist.ProcessGroup:
        """The group of a new generation, on `PrefixStore(prefix, store)`."""
        self.pg = dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), rank, size, self._options())
        return self.pg

    def track(self, work: Collective) -> None:
        """A collective of the current generation, to be waited for before its group is destroyed."""
        self.inflight = [w for w in self.inflight if not finished(w)] + [work]

    def _options(self):
        """Every generation's group on one Gloo device (one transport thread): a device per group
        left a thread per abandoned generation, spinning on the sockets of its dead peers."""
        if self.device is None:
            interface = os.environ.get("GLOO_SOCKET_IFNAME", "").split(",")[0]
            self.device = (dist.ProcessGroupGloo.create_device(interface=interface) if interface
                           else dist.ProcessGroupGloo.create_default_device())
        options = dist.ProcessGroupGloo._Options()
        options._devices = [self.device]
        options._timeout = self.timeout
        return options

    def abandon(self) -> None:
        """Leave the current generation: its group is destroyed once its collectives have ended."""
        if self.pg is not None:
            self.retiring.append((time.monotonic(), self.pg, self.inflight))
            self.pg, self.inflight = None, []
        self.reap()

    def reap(self) -> None:
        """Destroy the groups of abandoned generations whose collectives have ended (or that are
        older than twice the step timeout: Gloo's own timeout has ended them)."""
        if not self.retiring:
            return
        too_old = time.monotonic() - 2 * self.timeout.total_seconds()
        # Dropping the last reference destroys a group: its sockets close and its pairs leave the loop.
        self.retiring = [(since, pg, works) for since, pg, works in self.retiring
                         if since > too_old and not all(map(finished, works))]
