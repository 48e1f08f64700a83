"""What an attacker on the WAN finds: every open TCP port of the given addresses, and what each answers.

Run inside the attacker's namespace (shoal/launch/netbed_sites.py):

    python tests/sites/attacker.py 10.79.1.2 10.79.2.2     # prints one JSON object

A full connect scan of ports 1-65535 (non-blocking connects, a batch at a time; the ports that did
not answer asked again); then each open port is spoken to as a TLS server would be, with no client
certificate: the TLS version it agrees, and what reading from it gives (a refusal alert, a close,
or bytes); and as a plain-text service would be (a line of bytes, then read).
"""

from __future__ import annotations

import errno
import json
import select
import socket
import ssl
import sys

BATCH = 2048
WAIT_SECONDS = 2.0  # per batch: a port that has neither accepted nor refused by then is asked again
ROUNDS = 5  # connect attempts per port at most (nmap likewise probes again what did not answer)


def _connect_batch(address: str, ports: list[int], wait: float) -> tuple[list[int], list[int]]:
    """Non-blocking connects to `ports` at once: (the ports that accepted, those with no answer
    within `wait` seconds of quiet). A refused port is neither."""
    found, silent = [], []
    pending = {}
    poller = select.epoll()
    for port in ports:
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
    while pending and waited < wait:
        events = poller.poll(0.1)
        waited = waited + 0.1 if not events else waited
        for fd, _ in events:
            sock, port = pending.pop(fd)
            poller.unregister(fd)
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                found.append(port)
            sock.close()
    for sock, port in pending.values():
        silent.append(port)
        sock.close()
    poller.close()
    return found, silent


def scan_ports(address: str) -> tuple[list[int], list[int]]:
    """A connect scan of ports 1-65535: (open ports, ports that never answered). A port that stays
    silent (its SYN or the answer lost: a delay line under load drops packets, as a router does) is
    asked again, up to ROUNDS times, with a longer wait each round."""
    found, ports = [], list(range(1, 65536))
    for round_ in range(ROUNDS):
        silent = []
        for start in range(0, len(ports), BATCH):
            accepted, quiet = _connect_batch(address, ports[start:start + BATCH], WAIT_SECONDS * (round_ + 1))
            found += accepted
            silent += quiet
        ports = silent
        if not ports:
            break
    return sorted(found), sorted(ports)


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
    """{address: {open port: what it answered}, ..., "unanswered": {address: ports that never
    answered}}: a port is closed only when it refused."""
    report, unanswered = {}, {}
    for address in addresses:
        open_, unanswered[address] = scan_ports(address)
        report[address] = {str(port): {"tls": tls_probe(address, port), "plain": plain_probe(address, port)}
                           for port in open_}
    return {**report, "unanswered": unanswered}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])), flush=True)
