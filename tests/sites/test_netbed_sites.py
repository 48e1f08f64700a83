"""Sites on the sites netbed (shoal/launch/netbed_sites.py): each site a namespace behind a delayed link,
an attacker on the WAN. Needs root and `ip netns` (skipped with the reason elsewhere)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from shoal.launch.netbed import NetbedError
from shoal.launch.netbed_sites import ATTACKER, SitesNetbed, parse_rtt
from shoal.sites.certs import make_site_certs, revoke_site
from tests.conftest import SHOAL, TINY, wait_for
from tests.netbed.test_netbed import namespaces_unavailable
from tests.sites.listening import listening, process_tree, wildcard
from tests.sites.test_sites_run import DILOCO, read

PREFIX, SUBNET = "shtsites", "10.82.0.0/16"  # apart from a bed a user may have up
PORT = 7443
ATTACKER_SCAN = str(Path(__file__).with_name("attacker.py"))

needs_netns = pytest.mark.skipif(bool(namespaces_unavailable()), reason=str(namespaces_unavailable()))

ECHO = """
import socket, sys
server = socket.create_server((sys.argv[1], 5001)); print("ready", flush=True)
conn, _ = server.accept()
while data := conn.recv(64):
    conn.sendall(data)
"""

ROUND_TRIPS = """
import json, socket, sys, time
sock = socket.create_connection((sys.argv[1], 5001)); sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
seconds = []
for _ in range(5):
    start = time.perf_counter(); sock.sendall(b"p"); sock.recv(1); seconds.append(time.perf_counter() - start)
print(json.dumps(seconds))
"""


def test_bad_sites_netbeds_name_the_flag():
    assert parse_rtt("100ms") == 0.1 and parse_rtt("0.25s") == 0.25
    with pytest.raises(NetbedError, match="rtt '100'"):
        parse_rtt("100")
    with pytest.raises(NetbedError, match="two or more"):
        SitesNetbed(["a"])
    with pytest.raises(NetbedError, match="'a b'"):
        SitesNetbed(["a", "a b"])


@needs_netns
@pytest.mark.netns
def test_a_round_trip_between_sites_takes_the_rtt_and_a_cut_link_is_unreachable():
    with SitesNetbed(["a", "b"], rate=None, rtt="60ms", prefix=PREFIX, subnet=SUBNET) as bed:
        echo = bed.spawn("b", [sys.executable, "-c", ECHO, bed.address("b")], stdout=subprocess.PIPE, text=True)
        assert echo.stdout.readline().strip() == "ready"
        out = bed.spawn("a", [sys.executable, "-c", ROUND_TRIPS, bed.address("b")], stdout=subprocess.PIPE,
                        text=True).communicate(timeout=60)[0]
        seconds = json.loads(out)
        assert all(0.06 <= s < 0.06 + 0.05 for s in seconds), seconds  # held 15 ms on each of 4 crossings
        echo.wait(30)
        sent, received = bed.counters("a")
        assert sent >= 5 * 41 and received >= 5 * 41  # five 1-byte TCP segments each way, headers counted
        bed.cut("b")
        probe = bed.spawn("a", [sys.executable, "-c", f"import socket; socket.create_connection(('{bed.address('b')}', "
                                                      f"5001), timeout=5)"], stderr=subprocess.PIPE, text=True)
        assert "Network is unreachable" in probe.communicate(timeout=30)[1]
    assert not Path(f"/run/netns/{PREFIX}-wan").exists() and not Path(f"/run/netns/{PREFIX}-site-a").exists()


def site_command(bed: SitesNetbed, name: str, certs: Path) -> list[str]:
    other = "b" if name == "a" else "a"
    return [SHOAL, "run", *TINY, *DILOCO, "launch.nproc=1", "train.steps=100000", "sites.grace_seconds=3",
            f"log.name={name}", f"sites.name={name}", f"sites.listen={bed.address(name)}:{PORT}",
            f"sites.peers={other}={bed.address(other)}:{PORT}", f"sites.certs={certs}"]


@needs_netns
@pytest.mark.netns
def test_from_the_wan_only_the_tls_listeners_answer_and_a_revoked_site_is_refused(tmp_path):
    """Two sites (one worker each) train across a 40 ms link. An attacker on the WAN scans every port of
    both sites: it finds each site's TLS listener and nothing else (no store, no Gloo), and without a
    client certificate gets no byte from it. Then site b is revoked and its link cut: on the next
    connection site a refuses it and trains on alone."""
    certs = tmp_path / "certs"
    make_site_certs(certs, ["a", "b"])
    with SitesNetbed(["a", "b"], rate=None, rtt="40ms", prefix=PREFIX, subnet=SUBNET) as bed:
        outs = {name: tmp_path / f"{name}.out" for name in "ab"}
        procs = {name: bed.spawn(name, site_command(bed, name, certs), cwd=tmp_path, stdout=outs[name].open("w"),
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
                 for name in "ab"}
        try:
            wait_for(lambda: "with every site" in read(outs["a"]), 240, "a round across the WAN")
            for name, proc in procs.items():  # what the sites' own processes listen on (/proc, as ss -ltnp)
                listens = listening(process_tree(proc.pid))
                assert not wildcard(listens), listens
                assert (bed.address(name), PORT) in listens
                assert all(host == "127.0.0.1" for host, port in listens if port != PORT), listens

            scan = bed.spawn(ATTACKER, [sys.executable, ATTACKER_SCAN, bed.address("a"), bed.address("b")],
                             stdout=subprocess.PIPE, text=True)
            found = json.loads(scan.communicate(timeout=600)[0])
            # every port answered (accepted or refused), so "closed" below is what the port said
            assert found["unanswered"] == {bed.address("a"): [], bed.address("b"): []}, found["unanswered"]
            for name in "ab":
                assert list(found[bed.address(name)]) == [str(PORT)], found  # every other port is closed
                answer = found[bed.address(name)][str(PORT)]
                assert answer["tls"]["version"] == "TLSv1.3", answer
                assert answer["tls"]["read"].startswith(("refused", "closed")), answer  # not one byte of data
                assert answer["plain"].startswith("closed"), answer  # bytes that are not TLS: reset, nothing sent
            wait_for(lambda: f"refused a connection from {bed.address(ATTACKER)}" in read(outs["b"]), 30,
                     "site b to log the attacker")  # a sorts first: b listens for it and logs the scan's probes

            revoke_site(certs, "b")  # both sites read this folder's crl.pem before each connection
            before = len(read(outs["a"]))  # a link lost earlier (under the scan's load) does not count
            bed.cut("b")
            wait_for(lambda: "dropped site b" in read(outs["a"])[before:]
                     or "lost the link to site b" in read(outs["a"])[before:], 60, "site a to drop site b")
            bed.mend("b")
            wait_for(lambda: "refused site b" in read(outs["a"]), 60, "site a to refuse the revoked site")
            refusal = next(line for line in read(outs["a"]).splitlines() if "refused site b" in line)
            assert "revoked" in refusal, refusal
            seen = read(outs["a"]).index(refusal)
            wait_for(lambda: "averaged over sites a\n" in read(outs["a"])[seen:], 60, "site a to go on alone")
            assert "linked with site b" not in read(outs["a"])[seen:]
            events = [json.loads(line) for line in read(tmp_path / "runs" / "a" / "events.jsonl").splitlines()]
            assert any(e["event"] == "site_refused" and "revoked" in e.get("reason", "") for e in events)
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(30)
