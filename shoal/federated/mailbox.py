"""The server's mailbox: queued and open tasks per client, and the replies received, under one lock.

The gRPC service (`server.py`) puts what clients send into it; the round driver (`rounds.py`)
takes replies out with a deadline. Neither imports the other.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from shoal.federated import federation_pb2 as pb
from shoal.federated import transport

log = logging.getLogger("shoal.federated.server")
POLL_SECONDS = 1.0  # how long GetTask holds a call open before answering WAIT
LIVE_SECONDS = 10.0  # a client not heard from for this long is not sampled
ERROR_CHARS = 8192  # a client's traceback is logged up to this length


@dataclass
class ClientInfo:
    """What a client declared when it joined: the caps on what it may claim later."""

    num_samples: int
    num_val_samples: int
    num_classes: int
    last_seen: float = field(default_factory=time.monotonic)


@dataclass
class Reply:
    client_id: str
    kind: int
    round: int
    result: Any
    """The parsed payload (validated by the driver's parser) or None when the client reported an error."""


class Stopped(Exception):
    """The federation was stopped while the round driver waited."""


class Mailbox:
    """Queued tasks, open tasks and received replies, under one condition variable."""

    def __init__(self, parse: Callable[[str, pb.Task, pb.Result], Any]):
        self.cond = threading.Condition()
        self.clients: dict[str, ClientInfo] = {}
        self.queued: dict[str, pb.Task] = {}
        self.open: dict[str, pb.Task] = {}
        self.spent: set[bytes] = set()
        self.inbox: list[Reply] = []
        self.stopping = False
        self.excluded: set[str] = set()
        self.parse = parse

    def stop(self) -> None:
        """Send STOP to polling clients and end the round driver's waits (it raises Stopped)."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()

    def live(self) -> list[str]:
        """Clients heard from lately, less those excluded for breaking a round."""
        now = time.monotonic()
        with self.cond:
            return sorted(c for c, info in self.clients.items()
                          if now - info.last_seen < LIVE_SECONDS and c not in self.excluded)

    def exclude(self, client_ids: list[str]) -> None:
        """Never sample these clients again in this run (they still poll, and get no work)."""
        with self.cond:
            self.excluded.update(client_ids)

    def suspect(self, client_ids: list[str]) -> None:
        """Stop sampling clients that missed a deadline until they poll again (a dead one never does)."""
        with self.cond:
            for cid in client_ids:
                if cid in self.clients:
                    self.clients[cid].last_seen = -LIVE_SECONDS

    def assign(self, client_id: str, task: pb.Task) -> bytes:
        task.task_id = os.urandom(16)
        with self.cond:
            self.queued[client_id] = task
            self.cond.notify_all()
        return task.task_id

    def cancel(self, client_ids: list[str]) -> None:
        """Close the tasks of a finished phase: a late answer to them is refused as stale."""
        with self.cond:
            for cid in client_ids:
                self.queued.pop(cid, None)
                task = self.open.pop(cid, None)
                if task is not None:
                    self.spent.add(task.task_id)

    def take(self) -> list[Reply]:
        with self.cond:
            replies, self.inbox = self.inbox, []
            return replies

    def wait_replies(self, deadline: float) -> None:
        with self.cond:
            if not self.inbox:
                self.cond.wait(max(0.0, min(deadline - time.monotonic(), POLL_SECONDS)))

    def next_task(self, client_id: str) -> pb.Task:
        deadline = time.monotonic() + POLL_SECONDS
        with self.cond:
            while True:
                if client_id in self.clients:
                    self.clients[client_id].last_seen = time.monotonic()
                if client_id in self.queued:
                    task = self.queued.pop(client_id)
                    self.open[client_id] = task
                    return task
                if self.stopping:
                    return pb.Task(kind=pb.Task.STOP)
                left = deadline - time.monotonic()
                if left <= 0:
                    return pb.Task(kind=pb.Task.WAIT, wait_seconds=0.0)
                self.cond.wait(left)

    def submit(self, client_id: str, result: pb.Result) -> tuple[bool, str]:
        with self.cond:
            if client_id in self.clients:
                self.clients[client_id].last_seen = time.monotonic()
            task = self.open.get(client_id)
            reason = ""
            if result.task_id in self.spent:
                reason = "replayed or stale message: that task is already closed"
            elif task is None or task.task_id != result.task_id:
                reason = "out-of-round message: no open task with that id for this client"
            elif result.round != task.round:
                reason = f"round {result.round} does not match the task's round {task.round}"
            if reason:
                log.warning("refused a message from client '%s': %s", client_id, reason)
                return False, reason
            del self.open[client_id]
            self.spent.add(task.task_id)
        if result.error:
            text = result.error[:ERROR_CHARS] + ("\n[... cut]" if len(result.error) > ERROR_CHARS else "")
            log.error("client %s failed in round %d:\n%s", client_id, task.round, text.rstrip())
            parsed = None
        else:
            try:
                parsed = self.parse(client_id, task, result)
            except transport.BadUpdate as err:
                log.warning("rejected %s from client %s in round %d: %s", pb.Task.Kind.Name(task.kind),
                            client_id, task.round, err)
                with self.cond:
                    self.inbox.append(Reply(client_id, task.kind, task.round, None))
                    self.cond.notify_all()
                return False, str(err)
        with self.cond:
            self.inbox.append(Reply(client_id, task.kind, task.round, parsed))
            self.cond.notify_all()
        return True, ""
