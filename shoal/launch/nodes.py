"""Many hosts, one job: c10d rendezvous at HOST:PORT, as `torchrun --rdzv-backend c10d`.

Node rank 0 hosts the rendezvous store on PORT; the others connect to it. Both ends are
checked before any worker starts, so a busy port or an endpoint nobody answers is a
one-line error instead of a ten-minute hang.
"""

from __future__ import annotations

import socket
import time

from shoal.config import ConfigError
from shoal.launch.local import Rendezvous


def parse_endpoint(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--rdzv '{text}' must look like HOST:PORT with a port from 1 to 65535")
    return host, int(port)


def check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the store's own listener does: connections of a job that just ended (TIME_WAIT, as
        # when a preempted job is submitted again on the same node) do not block the port.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", port))
        except OSError:
            raise ConfigError(f"--rdzv {host}:{port}: port {port} is already in use on this host; "
                              f"pick another port") from None


def wait_for_endpoint(host: str, port: int, timeout: float) -> str:
    """Wait until the endpoint answers; returns this host's address on the route to it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=2) as sock:
                return sock.getsockname()[0]
        except OSError:
            if time.monotonic() > deadline:
                raise ConfigError(f"--rdzv {host}:{port}: nobody answered within {timeout:.0f} s; is node rank 0 "
                                  f"running `shoal launch --node-rank 0 --rdzv {host}:{port}`?") from None
            time.sleep(0.5)


def node_rendezvous(endpoint: str, nnodes: int, node_rank: int, timeout: int, run_id: str) -> Rendezvous:
    """Check the endpoint from this node's side and describe the rendezvous to join."""
    if nnodes < 1:
        raise ConfigError(f"--nnodes {nnodes} must be at least 1")
    if not 0 <= node_rank < nnodes:
        raise ConfigError(f"--node-rank {node_rank} must be between 0 and {nnodes - 1}")
    host, port = parse_endpoint(endpoint)
    if node_rank == 0:
        check_port_free(host, port)
        local_addr = host
    else:
        local_addr = wait_for_endpoint(host, port, timeout)
    # Peers must reach this host by an address, not by a hostname that may only resolve here.
    return Rendezvous(nnodes=nnodes, endpoint=f"{host}:{port}", is_host=node_rank == 0, run_id=run_id,
                      timeout=timeout, local_addr=local_addr)
