"""The cross-site plane in one process: real TLS 1.3 listeners on loopback, real certificates, real CRLs.

Each test starts site leaders' planes (no training), drives outer rounds from threads and reads
what crossed: the averages, the refusals in the log, and the bytes on the wire through a relay.
"""

from __future__ import annotations

import logging
import shutil
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest

from shoal.config import ConfigError
from shoal.sites import wire
from shoal.sites.certs import make_site_certs, revoke_site
from shoal.sites.plane import SitePlane
from tests.conftest import free_port, wait_for

LIMIT = wire.message_limits(1000)


@pytest.fixture(scope="module")
def certs_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("site-certs")
    make_site_certs(folder, ["a", "b", "c", "gone"])
    revoke_site(folder, "gone")
    make_site_certs(folder / "other-ca", ["a", "b"])  # the same names under another CA
    return folder


def planes(certs_dir: Path, names: list[str], grace: float = 5.0,
           address: dict[str, int] | None = None) -> dict[str, SitePlane]:
    ports = address or {name: free_port() for name in names}
    made = {}
    for name in names:
        peers = {p: ("127.0.0.1", ports[p]) for p in names if p != name}
        made[name] = SitePlane(name=name, listen=("127.0.0.1", ports[name]), peers=peers, certs_dir=certs_dir,
                               grace_seconds=grace, limit=LIMIT)
    for plane in made.values():
        plane.start()
    for plane in made.values():
        plane.wait_for_links(60)  # returns as soon as every link is up; the minute is for a loaded machine
        assert len(plane.linked()) == len(names) - 1, f"site {plane.name} linked only with {plane.linked()}"
    return made


def exchange_all(sites: dict[str, SitePlane], round_: int, payloads: dict[str, bytes],
                 steps: dict[str, int] | None = None) -> dict:
    results: dict = {}
    threads = [threading.Thread(target=lambda n=n: results.__setitem__(n, sites[n].exchange(
        round_, payloads[n], step=(steps or {}).get(n, 0)))) for n in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def test_three_sites_exchange_every_outer_gradient(certs_dir):
    sites = planes(certs_dir, ["a", "b", "c"])
    try:
        assert all(sorted(p.linked()) == sorted(set("abc") - {n}) for n, p in sites.items())
        payloads = {n: n.encode() * 40 for n in sites}
        steps = {"a": 5, "b": 10, "c": 2**40}  # each site's inner step, which travels with its outer gradient
        results = exchange_all(sites, 1, payloads, steps)
        for name in sites:
            assert results[name].payloads == dict(sorted(payloads.items()))
            assert results[name].steps == steps
            assert results[name].resync_from is None
    finally:
        for plane in sites.values():
            plane.close()


def test_a_missing_site_is_dropped_after_the_grace_window_and_joins_with_the_state(certs_dir, caplog):
    caplog.set_level(logging.INFO, logger="shoal.sites")
    sites = planes(certs_dir, ["a", "b"], grace=1.0)
    try:
        started = time.monotonic()
        result = sites["a"].exchange(1, b"only-a")  # b sends nothing this round
        waited = time.monotonic() - started
        assert result.payloads == {"a": b"only-a"}
        assert 1.0 <= waited < 2.0, f"waited {waited:.2f} s with a grace window of 1 s"
        assert "dropped site b from outer round 1: no outer gradient within" in caplog.text
        # b comes back late (after a's word that it was left out): b takes a's state after a's next round.
        wait_for(lambda: (wire.DROP, 1, "a") in sites["b"].inbox)
        late = sites["b"].exchange(1, b"late-b")
        assert late.resync_from == "a"
        wait_for(lambda: "b" in sites["a"].linked())  # a dialled b again (a sorts first)
        got: list = []
        joiner = threading.Thread(target=lambda: got.append(sites["b"].take_state("a", 10)))
        joiner.start()
        wait_for(lambda: sites["a"].peers["b"].joining)
        sites["a"].finish_round(1, b"\x01" * 32, lambda: b"STATE-OF-A")
        joiner.join(10)
        assert got == [(1, b"STATE-OF-A")]
        wait_for(lambda: "sent site b the state after outer round 1" in caplog.text)  # a's sender logs once sent
    finally:
        for plane in sites.values():
            plane.close()


def test_a_site_revoked_mid_run_is_refused_on_its_next_connection(certs_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="shoal.sites")
    folder = tmp_path / "certs"
    shutil.copytree(certs_dir, folder)
    sites = planes(folder, ["a", "b"])
    try:
        assert sites["a"].linked() == ["b"]
        revoke_site(folder, "b")  # crl.pem is read again before each connection
        sites["a"]._disconnect(sites["a"].peers["b"])  # the link drops; a dials b again
        wait_for(lambda: "refused site b at 127.0.0.1" in caplog.text)
        assert "certificate revoked" in caplog.text
        assert sites["a"].linked() == [] and sites["a"].exchange(1, b"x").payloads == {"a": b"x"}
    finally:
        for plane in sites.values():
            plane.close()


def test_sites_that_ended_a_round_apart_are_not_averaged_and_the_later_name_gives_way(certs_dir, caplog):
    caplog.set_level(logging.INFO, logger="shoal.sites")
    sites = planes(certs_dir, ["a", "b"])
    try:
        sites["a"].finish_round(1, b"\x0a" * 32, lambda: b"")
        sites["b"].finish_round(1, b"\x0b" * 32, lambda: b"")  # a link cut between two halves, say
        wait_for(lambda: sites["b"].peers["a"].status == (1, b"\x0a" * 32))
        wait_for(lambda: sites["a"].peers["b"].status == (1, b"\x0b" * 32))
        started = time.monotonic()
        assert sites["a"].exchange(2, b"a").payloads == {"a": b"a"}  # not waited for: another model
        assert time.monotonic() - started < 1.0
        result = sites["b"].exchange(2, b"b")
        assert result.payloads == {"b": b"b"} and result.resync_from == "a"
        assert "site a ended outer round 1 with another model; taking its state" in caplog.text
    finally:
        for plane in sites.values():
            plane.close()


def tls_client(certs_dir: Path, name: str | None, port: int) -> ssl.SSLSocket:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if name is not None:
        context.load_cert_chain(certs_dir / f"{name}.pem", certs_dir / f"{name}.key")
    sock = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5))
    return sock


def refused(sock: ssl.SSLSocket) -> bool:
    """True when the listener ends the connection without sending a byte of the plane."""
    try:
        return sock.recv(1) == b""
    except (ssl.SSLError, OSError):
        return True
    finally:
        sock.close()


def gets_nothing(folder: Path, name: str | None, port: int) -> bool:
    """A connection attempt that the listener refuses, in the handshake or right after it."""
    try:
        sock = tls_client(folder, name, port)
    except (ssl.SSLError, OSError):
        return True
    return refused(sock)


def test_connections_without_a_valid_site_certificate_get_nothing(certs_dir, caplog):
    caplog.set_level(logging.INFO, logger="shoal.sites")
    port = free_port()
    b = SitePlane(name="b", listen=("127.0.0.1", port), peers={"a": ("127.0.0.1", free_port())},
                  certs_dir=certs_dir, grace_seconds=1, limit=LIMIT)
    b.start()
    try:
        for name, folder, reason in [(None, certs_dir, "PEER_DID_NOT_RETURN_A_CERTIFICATE"),
                                     ("a", certs_dir / "other-ca", "CERTIFICATE_VERIFY_FAILED"),
                                     ("gone", certs_dir, "certificate revoked"),
                                     ("c", certs_dir, "presenting site 'c': that site is not one of sites.peers")]:
            caplog.clear()
            assert gets_nothing(folder, name, port), name
            wait_for(lambda: "refused a connection from 127.0.0.1" in caplog.text)
            assert reason in caplog.text, (name, caplog.text)
        assert b.linked() == []
    finally:
        b.close()


def test_a_dialled_site_presenting_another_name_is_refused(certs_dir, caplog):
    caplog.set_level(logging.INFO, logger="shoal.sites")
    port = free_port()
    impostor = SitePlane(name="c", listen=("127.0.0.1", port), peers={"a": ("127.0.0.1", free_port())},
                         certs_dir=certs_dir, grace_seconds=1, limit=LIMIT)
    a = SitePlane(name="a", listen=("127.0.0.1", free_port()), peers={"b": ("127.0.0.1", port)},
                  certs_dir=certs_dir, grace_seconds=1, limit=LIMIT)
    impostor.start()
    a.start()
    try:
        wait_for(lambda: "it presented site 'c', where site 'b' listens" in caplog.text)
        assert a.linked() == []
    finally:
        a.close()
        impostor.close()


def test_a_missing_or_forged_crl_refuses_every_connection(certs_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="shoal.sites")
    folder = tmp_path / "certs"
    shutil.copytree(certs_dir, folder)
    port = free_port()
    b = SitePlane(name="b", listen=("127.0.0.1", port), peers={"a": ("127.0.0.1", free_port())},
                  certs_dir=folder, grace_seconds=1, limit=LIMIT)
    b.start()
    try:
        (folder / "crl.pem").unlink()
        assert gets_nothing(folder, "a", port)
        wait_for(lambda: "the revocation list cannot be checked" in caplog.text)
        assert "crl.pem is missing" in caplog.text
        shutil.copy(certs_dir / "other-ca" / "crl.pem", folder / "crl.pem")  # signed by another CA
        caplog.clear()
        assert gets_nothing(folder, "a", port)
        wait_for(lambda: "not signed by this federation's CA" in caplog.text)
        assert b.linked() == []
        with pytest.raises(ConfigError, match="crl.pem"):
            wire.client_context(folder, "a")
    finally:
        b.close()


def test_a_message_longer_than_the_limit_is_refused_from_its_header(certs_dir, caplog):
    caplog.set_level(logging.INFO, logger="shoal.sites")
    port = free_port()
    b = SitePlane(name="b", listen=("127.0.0.1", port), peers={"a": ("127.0.0.1", free_port())},
                  certs_dir=certs_dir, grace_seconds=1, limit=LIMIT)
    b.start()
    try:
        sock = wire.connect("127.0.0.1", port, wire.client_context(certs_dir, "a"), 5)
        wait_for(lambda: b.linked() == ["a"])
        # An outer shard may be a third of an outer gradient, and no more: its header alone is refused.
        shard_limit = LIMIT[wire.SHARD]
        assert shard_limit == wire.DIGEST_BYTES + wire.STEP.size + 4 * 334 + wire.MARGIN
        assert shard_limit < LIMIT[wire.CONTRIB] < LIMIT[wire.STATE]
        sock.sendall(wire.HEADER.pack(wire.MAGIC, wire.SHARD, 1, shard_limit + 1))
        wait_for(lambda: "refused site a's message" in caplog.text)
        assert f"outer shard message of {shard_limit + 1} bytes, above the limit of {shard_limit}" in caplog.text
        wait_for(lambda: b.linked() == [])
        sock.close()
    finally:
        b.close()


class Relay:
    """A TCP relay between two sites that keeps every byte it forwards (the WAN, as a capture sees it),
    each connection's apart. A connection it cannot pass on (the far site not listening yet, on a
    loaded machine) is closed, as a real link would refuse it, and the site's retry gets a new one."""

    def __init__(self, target_port: int):
        self.target = target_port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.connections: list[tuple[bytearray, bytearray]] = []  # (to the server, to the client) of each
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def to_server(self) -> bytes:
        return b"".join(bytes(up) for up, _ in self.connections)

    @property
    def to_client(self) -> bytes:
        return b"".join(bytes(down) for _, down in self.connections)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            up, down = bytearray(), bytearray()
            self.connections.append((up, down))
            threading.Thread(target=self._pump, args=(client, upstream, up), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, down), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket, capture: bytearray) -> None:
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                data = b""
            if not data:
                sink.close()
                return
            capture += data
            try:
                sink.sendall(data)
            except OSError:
                source.close()
                return


def test_the_wire_holds_tls_1_3_and_no_run_of_a_marker_tensor(certs_dir):
    import torch

    from shoal.sites.outer import tensor_bytes

    marker = tensor_bytes(torch.arange(4096, dtype=torch.float32) * 0.25 + 1234.5)
    b_port = free_port()
    relay = Relay(b_port)
    a = SitePlane(name="a", listen=("127.0.0.1", free_port()), peers={"b": ("127.0.0.1", relay.port)},
                  certs_dir=certs_dir, grace_seconds=30, limit=wire.message_limits(4096))
    b = SitePlane(name="b", listen=("127.0.0.1", b_port), peers={"a": ("127.0.0.1", 1)},
                  certs_dir=certs_dir, grace_seconds=30, limit=wire.message_limits(4096))
    for plane in (a, b):
        plane.start()
    try:
        a.wait_for_links(60)
        b.wait_for_links(60)
        assert a.linked() == ["b"] and b.linked() == ["a"]
        results = exchange_all({"a": a, "b": b}, 1, {"a": marker, "b": marker[::-1]})
        assert results["b"].payloads["a"] == marker  # it crossed, through the relay
        captured = relay.to_server + relay.to_client
        assert len(relay.to_server) > len(marker)
        for start in range(0, len(marker) - 16, 16):  # no 16-byte run of the marker, either direction
            assert marker[start:start + 16] not in captured
        assert any(to_client for _, to_client in relay.connections)
        for to_server, to_client in relay.connections:  # every connection that got an answer
            if not to_client:
                continue
            # ServerHello (handshake record, type 2) naming TLS 1.3 in supported_versions (0x002b -> 0x0304)
            hello = bytes(to_client)
            assert hello[0] == 22 and hello[5] == 2
            assert b"\x00\x2b\x00\x02\x03\x04" in hello[:hello[3] * 256 + hello[4] + 5]
            assert bytes(to_server)[0] == 22  # ClientHello; then only encrypted records
    finally:
        a.close()
        b.close()
        relay.server.close()
