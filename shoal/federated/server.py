"""The federated server: a gRPC service over mutual TLS in front of the round driver's mailbox.

Clients pull work (`GetTask`, a short long-poll) and push results (`Submit`); the round driver
(`rounds.py`) only queues tasks and waits for replies with a deadline, so a client that
crashes, hangs or is killed costs the round its update, never the round itself. Every RPC
identifies the caller by its certificate's common name and checks the CRL, failing closed
when the CRL cannot be read; every result must quote the nonce of the task it answers, which
refuses replays and out-of-round messages. A Join is checked against the model the server's
config defines: a site never shapes the model, and what it declares caps what it may claim.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from shoal.config import Config, ConfigError, FederatedConfig
from shoal.federated import certs, transport
from shoal.federated import federation_pb2 as pb
from shoal.federated import federation_pb2_grpc as pb_grpc
from shoal.federated.gate import ConnectionGate, check_descriptors
from shoal.federated.mailbox import POLL_SECONDS, ClientInfo, Mailbox
from shoal.federated.rounds import RoundDriver

log = logging.getLogger("shoal.federated.server")


class FederationService(pb_grpc.FederationServicer):
    """The three RPCs; identity comes from the TLS certificate, checked against the CRL."""

    def __init__(self, mailbox: Mailbox, fed: FederatedConfig, run_name: str, gate: ConnectionGate | None = None):
        self.mailbox, self.fed, self.run_name, self.gate = mailbox, fed, run_name, gate
        self.certs_dir = Path(fed.certs_dir)
        self._crl_stamp: tuple[int, ...] | None = None
        self._revoked: set[int] = set()
        self._crl_error = ""
        self._crl_seen = False  # once a CRL was read, losing it fails closed whatever require_crl says
        self._crl_number = -1  # the highest CRL number read: an older CRL is refused (rollback)

    def _revoked_serials(self) -> set[int]:
        """The revoked serials; raises ConfigError while the CRL is missing, unreadable, forged or expired."""
        path = self.certs_dir / "crl.pem"
        try:
            st = path.stat()
            stamp: tuple[int, ...] = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            if not self.fed.require_crl and not self._crl_seen:
                return set()
            raise ConfigError(f"{path} is missing") from None
        if stamp != self._crl_stamp:  # re-read on change, so revoking needs no restart
            try:
                crl = certs.load_crl(self.certs_dir)
                number = certs.crl_number(crl)
                if number < self._crl_number:  # an older CRL put back would let a revoked site in again
                    raise ConfigError(f"{path} has CRL number {number}, older than number {self._crl_number} "
                                      f"this server already read (a rollback); put the newest CRL back")
                self._revoked, self._crl_error = {e.serial_number for e in crl}, ""
                self._crl_number, self._crl_seen = number, True
            except ConfigError as err:
                self._revoked, self._crl_error = set(), str(err)
            self._crl_stamp = stamp
        if self._crl_error:
            raise ConfigError(self._crl_error)
        return self._revoked

    def _peer(self, context: grpc.ServicerContext) -> str:
        """The caller's address as it reached the gate (gRPC itself sees the gate's loopback relay)."""
        return self.gate.address_of(context.peer()) if self.gate is not None else context.peer()

    def _identify(self, context: grpc.ServicerContext) -> str:
        cert = transport.peer_certificate(context)
        if cert is None:
            log.warning("refused %s: no client certificate", self._peer(context))
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "a client certificate is required")
        names = cert.subject.get_attributes_for_oid(certs.NameOID.COMMON_NAME)
        name = str(names[0].value) if names else ""
        refusal = certs.client_certificate_refusal(cert)
        if refusal:
            log.warning("refused client '%s' from %s: its certificate cannot identify a client: %s", name,
                        self._peer(context), refusal)
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"not a client certificate: {refusal}")
        try:
            revoked = self._revoked_serials()
        except ConfigError as err:  # fail closed: without a readable CRL no one is let in
            log.error("refused client '%s' from %s: the revocation list cannot be checked (%s); every connection "
                      "is refused until it is restored", name, self._peer(context), err)
            context.abort(grpc.StatusCode.UNAVAILABLE, "the server cannot check its revocation list")
        if cert.serial_number in revoked:
            log.warning("refused client '%s' from %s: certificate serial %x is revoked", name, self._peer(context),
                        cert.serial_number)
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "certificate revoked")
        if not name or name == "server":
            log.warning("refused %s: certificate has no usable common name", self._peer(context))
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "certificate has no client name")
        if self.gate is not None:
            self.gate.authenticated(context.peer())
        return name

    def _join_refusal(self, name: str, request: pb.JoinRequest) -> str:
        """Why this Join is refused ('' when it is accepted): every number a site declares is bounded here."""
        fed = self.fed
        if not 0 < request.num_samples <= fed.max_samples:
            return f"num_samples = {request.num_samples} is outside 1..{fed.max_samples} (federated.max_samples)"
        if not 0 <= request.num_val_samples <= fed.max_samples:
            return f"num_val_samples = {request.num_val_samples} is outside 0..{fed.max_samples}"
        if request.in_features != fed.in_features:
            return f"in_features = {request.in_features}; this federation's model takes {fed.in_features}"
        if not 0 < request.num_classes <= fed.num_classes:
            return f"num_classes = {request.num_classes}; this federation's model has {fed.num_classes} classes"
        known = self.mailbox.clients.get(name)
        declared = ClientInfo(request.num_samples, request.num_val_samples, request.num_classes)
        if known is not None and (known.num_samples, known.num_val_samples) != (declared.num_samples,
                                                                              declared.num_val_samples):
            return (f"'{name}' joined before with {known.num_samples} training and {known.num_val_samples} "
                    f"held-out samples; a site's declaration holds for the whole run")
        return ""

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        name = self._identify(context)
        with self.mailbox.cond:
            reason = self._join_refusal(name, request)
            if not reason:
                if name in self.mailbox.clients:
                    self.mailbox.clients[name].last_seen = time.monotonic()
                else:
                    self.mailbox.clients[name] = ClientInfo(request.num_samples, request.num_val_samples,
                                                            request.num_classes)
                self.mailbox.cond.notify_all()
        if reason:
            log.warning("refused client '%s' from %s at Join: %s", name, self._peer(context), reason)
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, reason)
        log.info("client '%s' joined from %s with %d samples", name, self._peer(context), request.num_samples)
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


class FederationServer:
    """gRPC on loopback behind the connection gate; `stop` ends both."""

    def __init__(self, grpc_server: grpc.Server, gate: ConnectionGate):
        self.grpc_server, self.gate = grpc_server, gate

    def stop(self, grace: float | None) -> threading.Event:
        stopped = self.grpc_server.stop(grace)
        stopped.wait((grace or 0.0) + 5.0)  # calls in flight finish through the gate, then it closes
        self.gate.stop()
        return stopped


def start_grpc(cfg: Config, driver: RoundDriver, run_name: str) -> tuple[FederationServer, int]:
    """Bind the TLS server behind its gate; returns it with the public port actually bound (for address ':0')."""
    fed = cfg.federated
    certs_dir = Path(fed.certs_dir)
    if fed.require_crl:  # fail closed from the start: a server without its CRL would admit revoked sites
        if not (certs_dir / "crl.pem").is_file():
            raise ConfigError(f"{certs_dir / 'crl.pem'} not found: the server will not start without the CA's "
                              f"revocation list (`shoal fed certs --out {certs_dir}` writes one; "
                              f"federated.require_crl = false accepts every certificate the CA signed)")
        certs.load_crl(certs_dir)
    elif not (certs_dir / "crl.pem").is_file():
        log.warning("no %s and federated.require_crl = false: revocation is off, every certificate the CA signed "
                    "is accepted until it expires", certs_dir / "crl.pem")
    host, sep, public_port = fed.address.rpartition(":")
    if not sep or not public_port.isdigit():
        raise ConfigError(f"federated.address = '{fed.address}' must look like host:port")
    if fed.max_pending > fed.max_connections:
        raise ConfigError(f"federated.max_pending = {fed.max_pending} is above federated.max_connections = "
                          f"{fed.max_connections}")
    limit = check_descriptors(fed)
    credentials = transport.server_credentials(certs_dir)
    options = transport.channel_options(driver.message_limit, server=True) + [
        # a backstop a second behind the gate's own deadline, so the gate (which logs it) closes them first
        ("grpc.server_handshake_timeout_ms", int(fed.handshake_timeout * 1000) + 1000),
        ("grpc.max_allowed_incoming_connections", fed.max_connections)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64), options=options)
    inner = server.add_secure_port("127.0.0.1:0", credentials)  # reachable through the gate only
    if inner == 0:
        raise ConfigError("cannot bind a loopback port for the federated server")
    gate = ConnectionGate(fed, inner)
    pb_grpc.add_FederationServicer_to_server(FederationService(driver.mailbox, fed, run_name, gate), server)
    server.start()
    try:
        port = gate.start(host.strip("[]"), int(public_port))
    except ConfigError:
        server.stop(0)
        raise
    log.info("connections: at most %d unauthenticated per address and %d in all, %d of any kind, each "
             "unauthenticated one closed after %.1fs; open-file limit %d", fed.max_pending_per_peer,
             fed.max_pending, fed.max_connections, fed.handshake_timeout, limit)
    return FederationServer(server, gate), port


def serve(cfg: Config, run_dir: Path) -> dict[str, Any]:
    """Run the whole federation (all rounds) and return the final metrics."""
    driver = RoundDriver(cfg, run_dir)
    server, port = start_grpc(cfg, driver, cfg.log.name)
    log.info("listening on %s (port %d) with mutual TLS; certificates from %s; messages up to %d bytes",
             cfg.federated.address, port, cfg.federated.certs_dir, driver.message_limit)
    (run_dir / "port").write_text(str(port))
    try:
        return driver.run()
    finally:
        driver.mailbox.stop()
        time.sleep(min(2 * POLL_SECONDS, 2.0))  # let polling clients hear STOP
        server.stop(grace=1.0).wait()
