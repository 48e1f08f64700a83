"""The federated server: a gRPC service over mutual TLS and a mailbox of tasks per client.

Clients pull work (`GetTask`, a short long-poll) and push results (`Submit`); the round driver
(`rounds.py`) only queues tasks and waits for replies with a deadline, so a client that
crashes, hangs or is killed costs the round its update, never the round itself. Every RPC
identifies the caller by its certificate's common name and checks the CRL; every result must
quote the nonce of the task it answers, which refuses replays and out-of-round messages.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import grpc

from shoal.config import Config, ConfigError
from shoal.federated import certs, transport
from shoal.federated import federation_pb2 as pb
from shoal.federated import federation_pb2_grpc as pb_grpc

log = logging.getLogger("shoal.federated.server")
POLL_SECONDS = 1.0  # how long GetTask holds a call open before answering WAIT
LIVE_SECONDS = 10.0  # a client not heard from for this long is not sampled


@dataclass
class ClientInfo:
    num_samples: int
    in_features: int
    num_classes: int
    last_seen: float = field(default_factory=time.monotonic)


@dataclass
class Reply:
    client_id: str
    kind: int
    round: int
    result: Any
    """The parsed payload (validated by the driver's parser) or None when the client reported an error."""


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
        self.parse = parse

    def live(self) -> list[str]:
        now = time.monotonic()
        with self.cond:
            return sorted(c for c, info in self.clients.items() if now - info.last_seen < LIVE_SECONDS)

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
            log.error("client %s failed in round %d:\n%s", client_id, task.round, result.error.rstrip())
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


class FederationService(pb_grpc.FederationServicer):
    """The three RPCs; identity comes from the TLS certificate, checked against the CRL."""

    def __init__(self, mailbox: Mailbox, certs_dir: Path, run_name: str):
        self.mailbox, self.certs_dir, self.run_name = mailbox, certs_dir, run_name
        self._crl_mtime = -1.0
        self._revoked: set[int] = set()

    def _revoked_serials(self) -> set[int]:
        path = self.certs_dir / "crl.pem"
        mtime = path.stat().st_mtime if path.exists() else 0.0
        if mtime != self._crl_mtime:  # re-read on change, so revoking needs no restart
            self._revoked, self._crl_mtime = certs.revoked_serials(self.certs_dir), mtime
        return self._revoked

    def _identify(self, context: grpc.ServicerContext) -> str:
        cert = transport.peer_certificate(context)
        if cert is None:
            log.warning("refused %s: no client certificate", context.peer())
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "a client certificate is required")
        names = cert.subject.get_attributes_for_oid(certs.NameOID.COMMON_NAME)
        name = str(names[0].value) if names else ""
        if cert.serial_number in self._revoked_serials():
            log.warning("refused client '%s' from %s: certificate serial %x is revoked", name, context.peer(),
                        cert.serial_number)
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "certificate revoked")
        if not name or name == "server":
            log.warning("refused %s: certificate has no usable common name", context.peer())
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "certificate has no client name")
        return name

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        name = self._identify(context)
        if not 0 < request.num_samples < 10 ** 12 or request.in_features <= 0 or request.num_classes <= 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "num_samples, in_features and num_classes must be positive")
        with self.mailbox.cond:
            known = {info.in_features for info in self.mailbox.clients.values()}
            if known and request.in_features not in known:
                log.warning("refused client '%s': %d input features, the federation has %s", name,
                            request.in_features, sorted(known))
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"in_features must be {sorted(known)[0]}")
            self.mailbox.clients[name] = ClientInfo(request.num_samples, request.in_features, request.num_classes)
            self.mailbox.cond.notify_all()
        log.info("client '%s' joined from %s with %d samples", name, context.peer(), request.num_samples)
        return pb.JoinReply(client_id=name, run=self.run_name)

    def GetTask(self, request: pb.TaskRequest, context: grpc.ServicerContext) -> pb.Task:
        name = self._identify(context)
        if name not in self.mailbox.clients:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "call Join first")
        return self.mailbox.next_task(name)

    def Submit(self, request: pb.Result, context: grpc.ServicerContext) -> pb.Ack:
        name = self._identify(context)
        accepted, reason = self.mailbox.submit(name, request)
        return pb.Ack(accepted=accepted, reason=reason)


def start_grpc(cfg: Config, mailbox: Mailbox, run_name: str) -> tuple[grpc.Server, int]:
    """Bind the TLS server; returns it with the port actually bound (for address ':0')."""
    fed = cfg.federated
    certs_dir = Path(fed.certs_dir)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64),
                         options=transport.channel_options(fed.max_message_mb))
    pb_grpc.add_FederationServicer_to_server(FederationService(mailbox, certs_dir, run_name), server)
    port = server.add_secure_port(fed.address, transport.server_credentials(certs_dir))
    if port == 0:
        raise ConfigError(f"federated.address = '{fed.address}' cannot be bound")
    server.start()
    return server, port


def serve(cfg: Config, run_dir: Path) -> dict[str, Any]:
    """Run the whole federation (all rounds) and return the final metrics."""
    from shoal.federated.rounds import RoundDriver

    driver = RoundDriver(cfg, run_dir)
    server, port = start_grpc(cfg, driver.mailbox, cfg.log.name)
    log.info("listening on %s (port %d) with mutual TLS; certificates from %s", cfg.federated.address, port,
             cfg.federated.certs_dir)
    (run_dir / "port").write_text(str(port))
    try:
        return driver.run()
    finally:
        with driver.mailbox.cond:
            driver.mailbox.stopping = True
            driver.mailbox.cond.notify_all()
        time.sleep(min(2 * POLL_SECONDS, 2.0))  # let polling clients hear STOP
        server.stop(grace=1.0).wait()

