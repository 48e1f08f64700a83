"""Which TCP addresses a set of processes listens on, read from /proc (what `ss -ltnp` shows)."""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from pathlib import Path


def process_tree(root: int) -> list[int]:
    """`root` and every process descended from it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _socket_inodes(pids: list[int]) -> set[str]:
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:  # the process ended meanwhile
            continue
    return inodes


def _address(hex_address: str) -> str:
    raw = bytes.fromhex(hex_address)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))  # /proc prints each 32-bit word host-order
    return str(ipaddress.ip_address(words))


def listening(pids: list[int], netns_pid: int | None = None) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state that one of `pids` holds, in their network
    namespace (that of `netns_pid`, default the first of `pids`)."""
    inodes = _socket_inodes(pids)
    found = []
    for table in ("tcp", "tcp6"):
        lines = Path(f"/proc/{netns_pid or pids[0]}/net/{table}").read_text().splitlines()[1:]
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A: TCP_LISTEN
                address, port = local.split(":")
                found.append((_address(address), int(port, 16)))
    return sorted(set(found))


def site_address() -> str | None:
    """An IPv4 address of this host other than loopback (a site's own network, for `sites.internal`)."""
    from shoal.launch.bound import interface_addresses
    held = [a for a in interface_addresses().values() if not ipaddress.ip_address(a).is_loopback]
    return held[0] if held else None


def wildcard(addresses: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """Those of `addresses` that listen on every interface."""
    return [(a, p) for a, p in addresses if ipaddress.ip_address(a).is_unspecified]
