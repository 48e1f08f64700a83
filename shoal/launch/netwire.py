"""A delay line between network namespaces: a long link's propagation delay, which this kernel cannot add.

This kernel has no `netem` (tc's delay), so the delay of a wide-area link is added here, below TCP:
each wire joins two TUN devices that live in different namespaces (made with `ip tuntap add`),
and every IP packet one end sends is held for `--delay-ms` before the other end receives it,
in order. Nothing above IP is read or changed: Gloo, a TCPStore and TLS alike cross it as they
would cross a long cable, and the kernels on both sides do their own TCP (windows, retransmits).
Rate limits stay the kernel's (`tc tbf` on the TUN devices, shoal/launch/netbed_sites.py).

    python -m shoal.launch.netwire --delay-ms 25 site-a:wan0=site-wan:s0 site-b:wan0=site-wan:s1

runs until SIGTERM or SIGINT; `NS:DEV` names the namespace (as in /run/netns) and the device.
It needs root (it enters the namespaces to attach to their devices).
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import heapq
import os
import selectors
import signal
import struct
import time

__all__ = ["attach_tun", "run_wires"]

_TUNSETIFF = 0x400454CA  # linux/if_tun.h
_IFF_TUN, _IFF_NO_PI = 0x0001, 0x1000
_CLONE_NEWNET = 0x40000000
_MAX_PACKET = 65535


def _enter_namespace(path: str) -> None:
    # os.setns arrives in Python 3.12; libc's setns(2) is the same call.
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def attach_tun(namespace: str, device: str) -> int:
    """A non-blocking file descriptor of TUN device `device` in namespace `namespace` (IP packets, no header).

    The device is looked up by name in the namespace this process is in, so the process enters that
    namespace for the call and returns to its own; the descriptor stays bound to the device."""
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        _enter_namespace(f"/run/netns/{namespace}")
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        try:
            fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", device.encode(), _IFF_TUN | _IFF_NO_PI))
        except OSError:
            os.close(fd)
            raise
    finally:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.setns(home, _CLONE_NEWNET)
        os.close(home)
    return fd


def run_wires(pairs: list[tuple[int, int]], delay: float, stop: list[bool]) -> None:
    """Carry packets both ways between each pair of TUN descriptors, each held `delay` seconds; until stop[0]."""
    partner = {}
    for left, right in pairs:
        partner[left], partner[right] = right, left
    selector = selectors.DefaultSelector()
    for fd in partner:
        selector.register(fd, selectors.EVENT_READ)
    held: list[tuple[float, int, int, bytes]] = []  # (due, sequence: FIFO among equal dues, to fd, packet)
    sequence = 0
    while not stop[0]:
        now = time.monotonic()
        while held and held[0][0] <= now:
            _, _, target, packet = heapq.heappop(held)
            try:
                os.write(target, packet)
            except OSError:  # that end is down (a cut link) or its queue is full: dropped, as a router drops
                pass
        timeout = max(0.0, held[0][0] - time.monotonic()) if held else 0.2
        for key, _ in selector.select(min(timeout, 0.2)):
            due = time.monotonic() + delay
            while True:
                try:
                    packet = os.read(key.fd, _MAX_PACKET)
                except BlockingIOError:
                    break
                except OSError:  # the device is gone (its namespace was deleted): stop reading it
                    selector.unregister(key.fd)
                    break
                heapq.heappush(held, (due, sequence, partner[key.fd], packet))
                sequence += 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shoal.launch.netwire", description=__doc__.split("\n\n")[0])
    parser.add_argument("--delay-ms", type=float, required=True, help="how long each packet is held, one way")
    parser.add_argument("wires", nargs="+", help="NS:DEV=NS:DEV, the two ends of one wire")
    args = parser.parse_args(argv)
    if args.delay_ms < 0:
        parser.error(f"--delay-ms = {args.delay_ms} must be 0 or more")
    pairs = []
    for wire in args.wires:
        ends = [end.partition(":") for end in wire.split("=")]
        if len(ends) != 2 or not all(namespace and sep and device for namespace, sep, device in ends):
            parser.error(f"wire '{wire}' must look like NS:DEV=NS:DEV")
        pairs.append(tuple(attach_tun(namespace, device) for namespace, _, device in ends))
    stop = [False]

    def request_stop(signum, frame):
        stop[0] = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    print("wires up", flush=True)  # the bed waits for this line: every device is attached
    run_wires(pairs, args.delay_ms / 1000, stop)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
