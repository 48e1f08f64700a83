"""The wide-area test bed: clear errors where it cannot run, and a rate limit that holds."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shoal import cli
from shoal.launch.netbed import Netbed, NetbedError, parse_rate
from tests.conftest import sigint_default

PREFIX, SUBNET = "shtest", "10.78.0.0/24"  # apart from a bed a user may have up

RECEIVER = """
import socket, sys, time, json
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], 5001)); srv.listen(1); print("ready", flush=True)
conn, _ = srv.accept(); total = 0; first = last = None
while chunk := conn.recv(1 << 16):
    now = time.perf_counter(); first = first or now; last = now; total += len(chunk)
print(json.dumps({"bytes": total, "seconds": last - first}), flush=True)
"""

SENDER = """
import socket, sys, time
sock = socket.create_connection((sys.argv[1], 5001)); block = b"x" * (1 << 16)
end = time.perf_counter() + float(sys.argv[2])
while time.perf_counter() < end: sock.sendall(block)
sock.close()
"""


def namespaces_unavailable() -> str | None:
    """Why namespaces cannot be made here, or None when they can."""
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "needs iproute2 (ip, tc)"
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    name = f"{PREFIX}probe{os.getpid()}"  # one per process: the suite's xdist workers collect at once
    probe = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create a network namespace: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", name], capture_output=True)
    return None


_UNAVAILABLE = namespaces_unavailable()
needs_netns = pytest.mark.skipif(bool(_UNAVAILABLE), reason=str(_UNAVAILABLE))


def test_parse_rate():
    assert parse_rate("20mbit") == 20_000_000
    assert parse_rate("1.5gbit") == 1_500_000_000
    with pytest.raises(NetbedError, match="megabytes|must look like"):
        parse_rate("20mbps")


def test_errors_without_root_or_tools(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(NetbedError, match="needs root"):
        Netbed(2, "20mbit", prefix=PREFIX).up()
    monkeypatch.setattr(shutil, "which", lambda tool: None if tool == "tc" else "/usr/sbin/ip")
    with pytest.raises(NetbedError, match="needs tc from iproute2"):
        Netbed(2, "20mbit", prefix=PREFIX).up()


def test_cli_reports_user_errors_with_exit_code_2(capsys):
    assert cli.main(["netbed", "up", "--workers", "2", "--rate", "fast", "--prefix", PREFIX]) == 2
    assert "shoal: error: rate 'fast'" in capsys.readouterr().err


def transfer(bed: Netbed, seconds: float) -> tuple[float, int]:
    """Send from worker 0 to worker 1 for `seconds`; (bits/s seen by the receiver, bytes received)."""
    receiver = bed.spawn(1, [sys.executable, "-c", RECEIVER, bed.address(1)], stdout=subprocess.PIPE, text=True)
    assert receiver.stdout.readline().strip() == "ready"
    bed.spawn(0, [sys.executable, "-c", SENDER, bed.address(1), str(seconds)]).wait(timeout=seconds + 30)
    result = json.loads(receiver.communicate(timeout=30)[0])
    return result["bytes"] * 8 / result["seconds"], result["bytes"]


@needs_netns
@pytest.mark.netns
def test_rate_limit_holds_and_counters_see_the_bytes():
    with Netbed(2, "20mbit", prefix=PREFIX, subnet=SUBNET) as bed:
        sent_before = bed.counters(0)[0]
        rate, payload = transfer(bed, 3.0)
        sent = bed.counters(0)[0] - sent_before
    assert 0.8 * 20e6 <= rate <= 1.2 * 20e6, f"measured {rate / 1e6:.1f} Mbit/s on a 20 Mbit/s link"
    # The counter sees the payload plus TCP/IP headers (~3-5 %), not an estimate of it.
    assert payload <= sent <= 1.1 * payload
    assert not os.path.exists(f"/run/netns/{PREFIX}0"), "namespaces left behind"


@needs_netns
@pytest.mark.netns
def test_cleanup_on_exception():
    with pytest.raises(RuntimeError):
        with Netbed(2, "20mbit", prefix=PREFIX, subnet=SUBNET):
            assert os.path.exists(f"/run/netns/{PREFIX}1")
            raise RuntimeError("a worker failed")
    assert not os.path.exists(f"/run/netns/{PREFIX}0") and not os.path.exists(f"/sys/class/net/{PREFIX}br")


@needs_netns
@pytest.mark.netns
def test_cleanup_on_ctrl_c():
    script = (f"import time; from shoal.launch.netbed import Netbed\n"
              f"with Netbed(2, '20mbit', prefix='{PREFIX}', subnet='{SUBNET}'):\n"
              f"    print('up', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            preexec_fn=sigint_default)
    assert proc.stdout.readline().strip() == "up"
    proc.send_signal(signal.SIGINT)  # as Ctrl-C sends
    proc.wait(timeout=30)
    time.sleep(0.1)
    assert not os.path.exists(f"/run/netns/{PREFIX}0") and not os.path.exists(f"/sys/class/net/{PREFIX}br")


@needs_netns
@pytest.mark.netns
@pytest.mark.e2e
def test_cli_up_stats_down():
    shoal = str(Path(sys.executable).parent / "shoal")
    common = ["--prefix", PREFIX]
    up = subprocess.run([shoal, "netbed", "up", "--workers", "2", "--rate", "10mbit", "--subnet", SUBNET, *common],
                        capture_output=True, text=True)
    try:
        assert up.returncode == 0, up.stderr
        assert "10.78.0.2" in up.stdout
        assert "rate 10Mbit" in subprocess.run(["tc", "qdisc", "show", "dev", f"{PREFIX}1h"],
                                               capture_output=True, text=True).stdout
        again = subprocess.run([shoal, "netbed", "up", "--workers", "2", *common], capture_output=True, text=True)
        assert again.returncode == 2 and "already up" in again.stderr
        stats = subprocess.run([shoal, "netbed", "stats", *common], capture_output=True, text=True)
        assert stats.returncode == 0 and "worker 1: sent" in stats.stdout
        inside = subprocess.run([shoal, "netbed", "run", *common, "1", "--", "cat", "/sys/class/net/eth0/address"],
                                capture_output=True, text=True)
        assert inside.returncode == 0 and inside.stdout.count(":") == 5
    finally:
        down = subprocess.run([shoal, "netbed", "down", *common], capture_output=True, text=True)
    assert down.returncode == 0, down.stderr
    assert not os.path.exists(f"/run/netns/{PREFIX}0")
