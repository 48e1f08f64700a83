"""What an attacker on the WAN finds: every open TCP port of the given addresses, and what each answers.

Run inside the attacker's namespace (shoal/launch/netbed_sites.py):

    python tests/sites/attacker.py 10.79.1.2 10.79.2.2     # prints one JSON object

A full connect scan of ports 1-65535 (non-blocking connects, a batch at a time); then each open port
is spoken to as a TLS server would be, with no client certificate: the TLS version it agrees, and
what reading from it gives (a refusal alert, a close, or bytes); and as a plain-text service would be
(a line of bytes, then read).
"""

from __future__ import annotations

import errno
import json
import select
import socket
import ssl
import sys

BATCH = 2048
WAIT_SECONDS = 2.0  # per batch: a port that has neither accepted nor refused by then is filtered


def open_ports(address: str) -> list[int]:
    found = []
    for start in range(1, 65536, BATCH):
        pending = {}
        poller = select.epoll()
        for port in range(start, min(start + BATCH, 65536)):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            code = sock.connect_ex((address, port))
            if code == 0:
                found.append(port)
                sock.close()
            elif code == errno.EINPROGRESS:
                pending[sock.fileno()] = (sock, port)
                poller.register(sock.fileno(), select.EPOLLOUT | select.EPOLLERR)
            else:
                sock.close()
        waited = 0.0
        while pending and waited < WAIT_SECONDS:
            events = poller.poll(0.1)
            waited = waited + 0.1 if not events else waited
            for fd, _ in events:
                sock, port = pending.pop(fd)
                poller.unregister(fd)
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    found.append(port)
                sock.close()
        for sock, _ in pending.values():
            sock.close()
        poller.close()
    return sorted(found)


def tls_probe(address: str, port: int) -> dict:
    """A TLS client without a certificate: what the server agrees, and what a read then gives."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # the attacker trusts anyone
    result = {"version": None, "handshake_error": None, "read": None}
    try:
        with socket.create_connection((address, port), timeout=10) as raw:
            with context.wrap_socket(raw) as sock:
                result["version"] = sock.version()  # a TLS 1.3 client's handshake ends before the server checks it
                try:
                    sock.sendall(b"\x00" * 24)
                    data = sock.recv(4096)
                    result["read"] = f"{len(data)} bytes" if data else "closed"
                except ssl.SSLError as err:
                    result["read"] = f"refused: {err.reason}"
                except OSError as err:
                    result["read"] = f"closed: {err}"
    except ssl.SSLError as err:
        result["handshake_error"] = err.reason
    except OSError as err:
        result["handshake_error"] = str(err)
    return result


def plain_probe(address: str, port: int) -> str:
    """A plain-text client: a line of bytes, then what comes back."""
    try:
        with socket.create_connection((address, port), timeout=10) as sock:
            sock.sendall(b"HELLO\r\n\r\n")
            data = sock.recv(4096)
            return f"{len(data)} bytes: {data[:40]!r}" if data else "closed"
    except OSError as err:
        return f"closed: {err}"


def main(addresses: list[str]) -> dict:
    report = {}
    for address in addresses:
        report[address] = {str(port): {"tls": tls_probe(address, port), "plain": plain_probe(address, port)}
                           for port in open_ports(address)}
    return report


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])), flush=True)
