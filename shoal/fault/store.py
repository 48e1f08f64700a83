"""The launcher's membership store as one replica uses it: reads and writes that end the job
cleanly when the store is lost, and the answer to a request to join.

Membership lives in the c10d TCPStore of the launcher (shoal/fault/membership.py is the other side;
shoal/runtime/protocol.py names every key). Nothing is unpickled: requests and generations are JSON.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from typing import Callable, TypeVar

import torch.distributed as dist

from shoal.fault.errors import StoreLost
from shoal.fault.replica import Replica
from shoal.runtime import protocol as keys
from shoal.runtime.protocol import STORE_ENV

T = TypeVar("T")


class ReplicaStore:
    """Store calls for one replica; a lost store ends the job cleanly instead of hanging it.

    A whole-model replica stops at the first failed call (StoreLost). The lanes of a replica
    group may each see the loss at a different call, so a lane only remembers it (`lost`), skips
    its other store calls and carries on through the step's group collectives to the next point
    where the lanes agree (`stop_if_lost`)."""

    def __init__(self, store: dist.Store, replica: Replica):
        self.store, self.replica = store, replica
        self.lost: StoreLost | None = None

    @staticmethod
    def connect(step_timeout: float) -> dist.TCPStore:
        """A client of the launcher's store, at the address the supervisor put in SHOAL_FT_STORE."""
        host, _, port = os.environ[STORE_ENV].rpartition(":")
        return dist.TCPStore(host, int(port), None, False, timeout=timedelta(seconds=max(step_timeout, 10.0)),
                             wait_for_workers=False)

    def call(self, call: Callable[[], T], fallback: T) -> T:
        """`call()`, or `fallback` once the store is lost."""
        if self.lost is not None:
            return fallback
        try:
            return call()
        except (dist.DistNetworkError, ConnectionError) as err:
            self.lost = StoreLost(f"membership store unreachable: {str(err).splitlines()[0]}")
            if not self.replica.grouped:
                raise self.lost from None
            return fallback

    def check(self, key: str) -> bool:
        return self.call(lambda: self.store.check([key]), False)

    def set(self, key: str, value: str) -> None:
        self.call(lambda: self.store.set(key, value), None)

    def get(self, key: str, *, missing: str, lost: str) -> str:
        """The text at `key`; `missing` when it is not set, `lost` when the store is gone."""
        return self.call(lambda: self.store.get(key).decode() if self.store.check([key]) else missing, lost)

    def stop_if_lost(self, lost: float) -> None:
        """Raise StoreLost on every lane of a replica group when one of them lost the store (`lost`
        is the count the lanes agreed on)."""
        if lost > 0:
            raise self.lost or StoreLost("another lane of this replica group lost the membership store")

    def await_assignment(self, seq: int, timeout: float, fallback: tuple[int, None]) -> tuple[int, dict | None]:
        """Wait for the coordinator to place this replica in a generation: (generation, its record),
        or `fallback` once the store is lost. DistStoreError after `timeout` seconds."""
        def wait() -> tuple[int, dict]:
            key = keys.assignment(self.replica.member, seq)
            self.store.wait([key], timedelta(seconds=timeout))
            gen = int(self.store.get(key))
            return gen, json.loads(self.store.get(keys.generation(gen)))
        return self.call(wait, fallback)

