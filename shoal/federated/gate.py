"""The federated server's front door: a socket-level accept limiter in front of gRPC's own TLS.

Before a client has authenticated, a connection costs the server a descriptor and handshake state
and proves nothing; ~1,100 half-open TLS handshakes once held a server at its descriptor limit.
gRPC's core offers a handshake deadline (`grpc.server_handshake_timeout_ms`, default 120 s) and a
cap on all incoming connections (`grpc.max_allowed_incoming_connections`), both set here, but no
cap per peer address. So the public port is this gate: it accepts TCP connections, refuses one
beyond `federated.max_pending_per_peer` unauthenticated connections from the same address or
`federated.max_pending` in all (and beyond `federated.max_connections` of any kind), and relays
the bytes of the others, untouched, to gRPC listening on loopback. TLS starts and ends in gRPC;
the gate never parses or terminates it, it only counts and copies bytes. A connection counts as
unauthenticated until the service has identified its caller's certificate on a first call
(`authenticated`); one still unauthenticated after `federated.handshake_timeout` is closed.

gRPC sees every caller as 127.0.0.1; `address_of` maps its peer string back to the real address
for the log. The loopback port is reachable from the server's own machine only.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import threading
from collections import Counter
from dataclasses import dataclass

from shoal.config import ConfigError, FederatedConfig

log = logging.getLogger("shoal.federated.server")
CHUNK = 256 * 1024
FDS_PER_CONNECTION = 3  # the client's socket and the relay's socket in the gate, gRPC's end of the relay
FD_RESERVE = 256  # gRPC's own pipes and threads, the CRL, the run directory's files, the log


@dataclass
class Connection:
    peer: str
    authenticated: bool = False


def check_descriptors(fed: FederatedConfig) -> int:
    """Make sure this process may open the descriptors `max_connections` needs (raising its soft limit up to
    the hard one if it must); returns the soft limit. ConfigError naming the field when it cannot."""
    needed = FDS_PER_CONNECTION * fed.max_connections + FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
            log.info("raised the open-file limit from %d to %d for federated.max_connections = %d", soft, needed,
                     fed.max_connections)
            return needed
        except (ValueError, OSError):  # above the hard limit (or the kernel's nr_open)
            pass
        raise ConfigError(f"federated.max_connections = {fed.max_connections} needs {needed} file descriptors "
                          f"({FDS_PER_CONNECTION} per connection + {FD_RESERVE}); this process may open {soft} "
                          f"(hard limit {hard}): raise `ulimit -n` or lower federated.max_connections")
    return soft


class ConnectionGate:
    """Accepts on the public address, caps unauthenticated connections, relays to gRPC on loopback."""

    def __init__(self, fed: FederatedConfig, upstream_port: int):
        self.fed, self.upstream_port = fed, upstream_port
        self.lock = threading.Lock()
        self.by_relay_port: dict[int, Connection] = {}
        self.pending: Counter[str] = Counter()
        self.open = 0
        self.refused = 0
        self.admitted = 0
        self._warned: set[str] = set()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="federated-gate", daemon=True)
        self.server: asyncio.base_events.Server | None = None

    def start(self, host: str, port: int) -> int:
        """Listen on host:port; returns the port bound (for port 0)."""
        self.thread.start()
        try:
            self.server = asyncio.run_coroutine_threadsafe(
                asyncio.start_server(self._handle, host or None, port, backlog=self.fed.max_connections), self.loop
            ).result(timeout=30)
        except OSError as err:
            self.stop()
            raise ConfigError(f"federated.address = '{host}:{port}' cannot be bound: {err}") from None
        return self.server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        if self.refused:
            log.info("connections refused before authentication: %d (admitted %d)", self.refused, self.admitted)

        async def close() -> None:
            if self.server is not None:
                self.server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        if self.loop.is_running():
            asyncio.run_coroutine_threadsafe(close(), self.loop).result(timeout=10)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)

    # --- called by the service ------------------------------------------------------------

    def _relay_port(self, grpc_peer: str) -> int | None:
        host, _, port = grpc_peer.rpartition(":")
        return int(port) if host.startswith("ipv4:127.0.0.1") and port.isdigit() else None

    def authenticated(self, grpc_peer: str) -> None:
        """The service identified a certificate on this connection: it no longer counts as pending."""
        with self.lock:
            conn = self.by_relay_port.get(self._relay_port(grpc_peer) or -1)
            if conn is not None and not conn.authenticated:
                conn.authenticated = True
                self.pending[conn.peer] -= 1

    def address_of(self, grpc_peer: str) -> str:
        """The caller's real address behind gRPC's loopback peer string."""
        with self.lock:
            conn = self.by_relay_port.get(self._relay_port(grpc_peer) or -1)
        return conn.peer if conn is not None else grpc_peer

    # --- the relay --------------------------------------------------------------------------

    def _admit(self, peer: str) -> str:
        """Why a new connection from `peer` is refused ('' when it is admitted and counted)."""
        with self.lock:
            if self.pending[peer] >= self.fed.max_pending_per_peer:
                return (f"{self.pending[peer]} unauthenticated connections from this address already "
                        f"(federated.max_pending_per_peer)")
            if sum(self.pending.values()) >= self.fed.max_pending:
                return f"{self.fed.max_pending} unauthenticated connections already (federated.max_pending)"
            if self.open >= self.fed.max_connections:
                return f"{self.open} connections already (federated.max_connections)"
            self.pending[peer] += 1
            self.open += 1
            self.admitted += 1
            return ""

    def _release(self, conn: Connection, relay_port: int | None) -> None:
        with self.lock:
            self.open -= 1
            if not conn.authenticated:
                self.pending[conn.peer] -= 1
            if relay_port is not None:
                self.by_relay_port.pop(relay_port, None)
            if self.pending[conn.peer] <= 0:
                del self.pending[conn.peer]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = str((writer.get_extra_info("peername") or ("?",))[0])
        reason = self._admit(peer)
        if reason:
            self.refused += 1
            if peer not in self._warned:  # once per address: an attacker must not fill the log instead
                self._warned.add(peer)
                log.warning("refused a connection from %s before authentication: %s (further refusals of this "
                            "address are counted, not logged)", peer, reason)
            writer.transport.abort()
            return
        conn, relay_port = Connection(peer), None
        upstream: asyncio.StreamWriter | None = None
        try:
            up_reader, upstream = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            relay_port = upstream.get_extra_info("sockname")[1]
            with self.lock:
                self.by_relay_port[relay_port] = conn
            pipes = [asyncio.ensure_future(self._pipe(reader, upstream)),
                     asyncio.ensure_future(self._pipe(up_reader, writer))]
            done, _ = await asyncio.wait(pipes, timeout=self.fed.handshake_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
            if not done and not conn.authenticated:
                log.info("closed a connection from %s: not authenticated within %.1fs (federated.handshake_timeout)",
                         peer, self.fed.handshake_timeout)
            elif not done:
                await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
            for pipe in pipes:
                pipe.cancel()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            for end in (writer, upstream):
                if end is not None:
                    end.transport.abort()
            self._release(conn, relay_port)

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        while True:
            data = await source.read(CHUNK)
            if not data:
                return
            sink.write(data)
            await sink.drain()
