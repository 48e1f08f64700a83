"""The rendezvous store and Gloo of one host's run, listening on one address instead of every interface.

torch's TCPStore listens on `*:PORT` whatever host it is given (torch 2.13, both of its backends;
pytorch#173909), and Gloo listens on the address its host name resolves to. On a host that also
faces another network (a site's leader facing the WAN) both would be reachable from there. So:

- the launcher binds the store's listening socket itself, to the one address, and hands it to
  TCPStore (`master_listen_fd`). The elastic agent's rendezvous runs on that store (the
  `shoal-bound` rendezvous backend below: torch's own c10d handler, given this store), and the
  store the agent opens for its workers is that one too: torch 2.13's handler would open a second
  server on a free port of every interface (`_create_tcp_store_server`), so the handler is given
  this one instead (the workers' keys live under their own prefix, shoal/runtime/env.py).
- `GLOO_SOCKET_IFNAME` names the interface that holds the address (`lo` for loopback), unless the
  user set it, so every worker's Gloo device listens there and nowhere else.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import struct
from datetime import timedelta

import torch.distributed as dist
from torch.distributed.elastic.rendezvous import (RendezvousHandler, RendezvousParameters,
                                                  rendezvous_handler_registry)
from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler

from shoal.config import ConfigError

__all__ = ["BACKEND", "BoundStore", "interface_addresses", "interface_of", "listen_on"]

BACKEND = "shoal-bound"
"""The elastic agent's rendezvous backend on a BoundStore (its endpoint's port says which)."""

_SIOCGIFADDR = 0x8915  # linux/sockios.h: an interface's IPv4 address


def _ipv4(host: str) -> str | None:
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET)
    except socket.gaierror:
        return None
    return infos[0][4][0] if infos else None


def interface_addresses() -> dict[str, str]:
    """{interface name: its IPv4 address} for every interface of this host that has one."""
    found = {}
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(probe.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address on it
                continue
            found[name] = socket.inet_ntoa(packed[20:24])
    finally:
        probe.close()
    return found


def interface_of(host: str) -> str | None:
    """The name of this host's network interface that holds `host`'s IPv4 address; None if none does."""
    address = _ipv4(host)
    if address is None:
        return None
    for name, held in interface_addresses().items():
        if held == address or (ipaddress.ip_address(address).is_loopback and ipaddress.ip_address(held).is_loopback):
            return name
    return None


def listen_on(host: str, port: int = 0, *, field: str) -> socket.socket:
    """A TCP socket listening on `host`:`port` only; ConfigError naming `field` when this host cannot
    (an address it does not hold, a name that does not resolve, a wildcard, a port in use)."""
    try:
        unspecified = ipaddress.ip_address(host).is_unspecified
    except ValueError:  # a host name: bind() resolves it
        unspecified = False
    if unspecified:
        raise ConfigError(f"{field} = '{host}' would listen on every interface; give one address of this host")
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(socket.SOMAXCONN)
    except OSError as err:
        listener.close()
        raise ConfigError(f"{field}: cannot listen on {host}:{port} ({err.strerror}); give an address of this "
                          f"host (loopback or its own network)") from None
    return listener


class BoundStore:
    """A TCPStore server listening on `host` only (port 0: any free one); alive until `close()`.

    `field` names the setting the address came from, for the error when this host does not hold it.
    """

    def __init__(self, host: str, port: int = 0, *, field: str = "launch", timeout: float = 60.0):
        listener = listen_on(host, port, field=field)
        self.host, self.port = host, listener.getsockname()[1]
        # TCPStore owns the descriptor from here (it closes it with the server).
        self.store = dist.TCPStore(host, self.port, None, True, timeout=timedelta(seconds=timeout),
                                   wait_for_workers=False, master_listen_fd=listener.detach())
        _register_backend()
        _BOUND[self.port] = self

    @property
    def endpoint(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def gloo_environment(self) -> dict[str, str]:
        """GLOO_SOCKET_IFNAME for the workers: the interface of the store's address, unless already set."""
        if os.environ.get("GLOO_SOCKET_IFNAME"):
            return {}
        interface = interface_of(self.host)
        return {"GLOO_SOCKET_IFNAME": interface} if interface else {}

    def close(self) -> None:
        _BOUND.pop(self.port, None)
        self.store = None  # the last reference: the server stops and its socket closes


_BOUND: dict[int, BoundStore] = {}


def _create_handler(params: RendezvousParameters) -> RendezvousHandler:
    """torch's c10d rendezvous handler on the BoundStore its endpoint names, for rendezvous and workers alike."""
    bound = _BOUND[int(params.endpoint.rpartition(":")[2])]
    handler = create_handler(bound.store, C10dRendezvousBackend(bound.store, params.run_id), params)
    # Its own method would open the workers' store on a free port of every interface (torch 2.13).
    handler._create_tcp_store_server = lambda master_addr, master_port: bound.store
    handler._backend_name = BACKEND  # the registry checks that the handler answers to the name asked for
    return handler


def _register_backend() -> None:
    rendezvous_handler_registry.register(BACKEND, _create_handler)  # again with the same creator: a no-op
