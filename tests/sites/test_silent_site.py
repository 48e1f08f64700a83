"""A site that goes silent mid-run is dropped within the grace window, however large the outer gradient.

The silent site is a real process, SIGSTOPped: its socket stays open and reads nothing, as over a
cut link (a killed site's kernel closes its socket, which the other site sees at once; a stopped
or cut one says nothing). Its link then takes bytes only until the socket buffers are full, so a
round's outer gradient larger than them is never sent; the round must still end after the grace
window, with the silent site dropped.

Slow: a second process; run under the CPU lock (`flock /tmp/shoal-cpu.lock`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from shoal.sites import wire
from shoal.sites.certs import make_site_certs
from shoal.sites.plane import RoundResult, SitePlane
from tests.conftest import free_port, wait_for

pytestmark = pytest.mark.slow

GRACE = 2.0
REPO = Path(__file__).resolve().parents[2]


def buffered_bytes() -> int:
    """The most a connection to a stopped peer can hold: this side's send buffer and that side's receive buffer."""
    send = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    receive = int(Path("/proc/sys/net/ipv4/tcp_rmem").read_text().split()[2])
    return send + receive


def test_a_stopped_site_is_dropped_within_the_grace_window_and_the_other_trains_on(tmp_path):
    certs = tmp_path / "certs"
    make_site_certs(certs, ["a", "b"])
    payload = bytes(range(256)) * (buffered_bytes() * 3 // 2 // 256)  # more than the link can hold
    limit = len(payload) + wire.MARGIN
    ports = {"a": free_port(), "b": free_port()}
    b = subprocess.Popen([sys.executable, "-m", "tests.sites.plane_site", str(certs), "b", str(ports["b"]),
                          f"a={ports['a']}", str(limit)], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True, start_new_session=True)
    events: list[tuple[str, dict]] = []
    a = SitePlane(name="a", listen=("127.0.0.1", ports["a"]), peers={"b": ("127.0.0.1", ports["b"])},
                  certs_dir=certs, grace_seconds=GRACE, limit=limit,
                  events=lambda kind, **fields: events.append((kind, fields)))
    a.start()
    try:
        assert b.stdout.readline().strip() == "linked"
        a.wait_for_links(60)
        first = a.exchange(1, payload)
        assert first.payloads == {"a": payload, "b": b"b-round-1"}
        assert b.stdout.readline().strip() == "round 1: a, b"  # b read a's whole outer gradient
        a.finish_round(1, b"\x01" * 32, lambda: b"")

        os.kill(b.pid, signal.SIGSTOP)  # b holds its socket open and reads nothing from now on
        got: list[RoundResult] = []
        started = time.monotonic()
        second = threading.Thread(target=lambda: got.append(a.exchange(2, payload)), daemon=True)
        second.start()
        second.join(GRACE + 20)  # bounds a hang only: the round ends after the grace window
        waited = time.monotonic() - started
        assert got, f"site a's outer round 2 still blocked {waited:.0f} s after site b stopped (grace {GRACE:g} s)"
        assert got[0].payloads == {"a": payload}
        assert waited < GRACE + 3, f"the round took {waited:.1f} s with a grace window of {GRACE:g} s"
        drops = [fields for kind, fields in events if kind == "site_dropped" and fields["site"] == "b"]
        assert drops and drops[0]["round"] == 2, events
        assert "its link is silent" in drops[0]["reason"]  # a's gradient to b was stuck, as over a cut link
        wait_for(lambda: a.linked() == [], 10, "a to take the silent link down")

        third = a.exchange(3, b"a-round-3")  # a trains on alone, without waiting for b
        assert third.payloads == {"a": b"a-round-3"}
    finally:
        a.close()
        os.killpg(b.pid, signal.SIGKILL)
        b.wait(30)
