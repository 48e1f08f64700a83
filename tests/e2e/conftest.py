"""Two hosts on one machine: network namespaces joined by a veth pair (needs root)."""

import os
import shutil
import subprocess
import uuid

import pytest


def _can_make_namespaces() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip`"
    name = f"shoalprobe{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True)
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None if made.returncode == 0 else f"cannot create network namespaces: {made.stderr.decode().strip()}"


@pytest.fixture
def two_hosts():
    """Two network namespaces joined by a veth pair: host a 10.77.0.1, host b 10.77.0.2."""
    reason = _can_make_namespaces()
    if reason:
        pytest.skip(reason)
    tag = uuid.uuid4().hex[:5]
    hosts = [f"shoal-a-{tag}", f"shoal-b-{tag}"]
    links = [f"sa{tag}", f"sb{tag}"]

    def ip(*args):
        subprocess.run(["ip", *args], check=True, capture_output=True)

    try:
        for host in hosts:
            ip("netns", "add", host)
        ip("link", "add", links[0], "type", "veth", "peer", "name", links[1])
        for i, (host, link) in enumerate(zip(hosts, links)):
            ip("link", "set", link, "netns", host)
            ip("-n", host, "addr", "add", f"10.77.0.{i + 1}/24", "dev", link)
            ip("-n", host, "link", "set", link, "up")
            ip("-n", host, "link", "set", "lo", "up")
        yield list(zip(hosts, links))
    finally:
        for host in hosts:
            subprocess.run(["ip", "netns", "del", host], capture_output=True)
