"""A wide-area network on one machine: N network namespaces on a bridge, each link rate-limited.

Each worker namespace `<prefix><i>` holds one end of a veth pair (`eth0`,
address 10.77.0.<i+1>); the other end (`<prefix><i>h`) sits on the bridge
`<prefix>br` in the host namespace. A `tc` token bucket (`tbf`) on both ends
limits the worker's upload and download to `rate`, like a host behind a slow
link. This kernel has no `netem`, so there is no added latency here.

Bytes on the wire come from the kernel's own counters of the host-side veth
(`/sys/class/net/<prefix><i>h/statistics/{rx,tx}_bytes`): what the host end
receives is what the worker sent, headers and retransmissions included.

    with Netbed(workers=4, rate="20mbit") as bed:
        procs = [bed.spawn(i, ["python", "train.py"], env=bed.env(i)) for i in range(4)]
        ...
        sent, received = bed.counters(0)

It needs root and iproute2 (`ip`, `tc`). The context manager removes
everything on exit, also on Ctrl-C and SIGTERM; `shoal netbed down` removes a
bed left by `shoal netbed up`.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Any, Sequence

from shoal.launch.netns import NetbedError, check_host as _check_host, parse_rate, run as _run

__all__ = ["Netbed", "NetbedError", "parse_rate", "register"]

class Netbed:
    """N namespaces as N hosts on a bridge, each link limited to `rate` in both directions."""

    def __init__(self, workers: int, rate: str | None = "20mbit", *, prefix: str = "shoal",
                 subnet: str = "10.77.0.0/24"):
        if workers < 1:
            raise NetbedError(f"--workers = {workers} must be at least 1")
        if not re.fullmatch(r"[a-z][a-z0-9]{0,7}", prefix):
            raise NetbedError(f"prefix '{prefix}' must be 1-8 lowercase letters or digits (interface names "
                              f"are limited to 15 characters)")
        self.workers = workers
        self.rate_bits = parse_rate(rate) if rate else None
        self.prefix = prefix
        self.network = ipaddress.ip_network(subnet)
        if workers + 2 > self.network.num_addresses:
            raise NetbedError(f"subnet {subnet} is too small for {workers} workers")
        self.bridge = f"{prefix}br"
        self._old_sigterm: Any = None

    def namespace(self, worker: int) -> str:
        return f"{self.prefix}{worker}"

    def host_link(self, worker: int) -> str:
        """The host-side end of worker's veth pair, where its byte counters are read."""
        return f"{self.prefix}{worker}h"

    def address(self, worker: int) -> str:
        return str(self.network.network_address + worker + 1)

    def up(self) -> Netbed:
        """Create the bridge, the namespaces and the limited links; on any failure undo it all."""
        _check_host()
        if Path(f"/sys/class/net/{self.bridge}").exists():
            raise NetbedError(f"a netbed named '{self.prefix}' is already up: run `shoal netbed down` first")
        try:
            _run("ip", "link", "add", self.bridge, "type", "bridge")
            _run("ip", "link", "set", self.bridge, "up")
            for worker in range(self.workers):
                self._add_worker(worker)
        except BaseException:
            self.down()
            raise
        return self

    def _add_worker(self, worker: int) -> None:
        ns, host = self.namespace(worker), self.host_link(worker)
        prefix_len = self.network.prefixlen
        _run("ip", "netns", "add", ns)
        _run("ip", "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _run("ip", "link", "set", host, "master", self.bridge)
        _run("ip", "link", "set", host, "up")
        _run("ip", "-n", ns, "addr", "add", f"{self.address(worker)}/{prefix_len}", "dev", "eth0")
        _run("ip", "-n", ns, "link", "set", "eth0", "up")
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        if self.rate_bits:
            # Upload leaves the namespace's eth0, download leaves the host end: limit both.
            self._limit(["ip", "netns", "exec", ns, "tc"], "eth0")
            self._limit(["tc"], host)

    def _limit(self, tc: list[str], device: str) -> None:
        # tbf drops packets larger than its bucket: keep the burst at 10 ms of traffic and above
        # a 64 KiB GSO segment.
        burst = max(self.rate_bits // 8 // 100, 65536)
        _run(*tc, "qdisc", "replace", "dev", device, "root", "tbf", "rate", f"{self.rate_bits}bit",
             "burst", str(burst), "latency", "200ms")

    def down(self) -> None:
        """Remove every namespace and the bridge of this prefix; safe to call twice."""
        listed = _run("ip", "netns", "list", check=False).stdout.split("\n")
        pattern = re.compile(rf"{re.escape(self.prefix)}\d+")
        for line in listed:
            name = line.split(" ")[0]
            if pattern.fullmatch(name):
                # Deleting the namespace deletes its veth pair; the host end goes with it.
                _run("ip", "netns", "delete", name, check=False)
        _run("ip", "link", "delete", self.bridge, check=False)

    def spawn(self, worker: int, argv: Sequence[str], **popen: Any) -> subprocess.Popen:
        """Start `argv` inside worker's namespace (as a subprocess of this one)."""
        return subprocess.Popen(["ip", "netns", "exec", self.namespace(worker), *argv], **popen)

    def env(self, worker: int, base: dict[str, str] | None = None) -> dict[str, str]:
        """An environment for a worker: Gloo talks over eth0, the only link out of the namespace."""
        env = dict(os.environ if base is None else base)
        env["GLOO_SOCKET_IFNAME"] = "eth0"
        return env

    def counters(self, worker: int) -> tuple[int, int]:
        """(bytes sent, bytes received) by worker so far, from the kernel's interface counters."""
        stats = Path("/sys/class/net") / self.host_link(worker) / "statistics"
        return int((stats / "rx_bytes").read_text()), int((stats / "tx_bytes").read_text())

    def __enter__(self) -> Netbed:
        if _is_main_thread():
            # SIGTERM (e.g. from a job scheduler) would skip __exit__; turn it into an exception.
            self._old_sigterm = signal.signal(signal.SIGTERM, _raise_interrupt)
        return self.up()

    def __exit__(self, *exc_info: Any) -> None:
        self.down()
        if self._old_sigterm is not None:
            signal.signal(signal.SIGTERM, self._old_sigterm)


def _is_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _cmd_up(args: argparse.Namespace) -> int:
    bed = Netbed(args.workers, None if args.rate == "none" else args.rate, prefix=args.prefix,
                 subnet=args.subnet).up()
    for worker in range(bed.workers):
        print(f"worker {worker}: namespace {bed.namespace(worker)}  address {bed.address(worker)}  "
              f"link {bed.host_link(worker)}  rate {args.rate}")
    print(f"run inside one: shoal netbed run --prefix {args.prefix} 0 -- <command>; "
          f"remove: shoal netbed down --prefix {args.prefix}")
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    _check_host()
    Netbed(1, None, prefix=args.prefix).down()
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    _check_host()
    bed = Netbed(args.worker + 1, None, prefix=args.prefix)
    if not Path(f"/run/netns/{bed.namespace(args.worker)}").exists():
        raise NetbedError(f"no namespace {bed.namespace(args.worker)}: run `shoal netbed up` first")
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise NetbedError("netbed run needs a command after --")
    return bed.spawn(args.worker, command, env=bed.env(args.worker)).wait()


def _cmd_stats(args: argparse.Namespace) -> int:
    bed = Netbed(1, None, prefix=args.prefix)
    worker = 0
    while Path(f"/sys/class/net/{bed.host_link(worker)}").exists():
        sent, received = bed.counters(worker)
        print(f"worker {worker}: sent {sent} bytes, received {received} bytes")
        worker += 1
    if worker == 0:
        raise NetbedError(f"no netbed '{args.prefix}' is up")
    return 0


def register(subparsers: Any) -> None:
    """Add `shoal netbed up|down|run|stats` to the shoal command."""
    netbed = subparsers.add_parser("netbed", help="a slow wide-area network on this machine (needs root)",
                                   description=__doc__.split("\n\n")[0])
    actions = netbed.add_subparsers(dest="netbed_command", required=True)

    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--prefix", default="shoal", help="names of the namespaces and the bridge")

    up = actions.add_parser("up", help="create N namespaces on a bridge with limited links")
    up.add_argument("--workers", type=int, default=4, help="namespaces (hosts) to create")
    up.add_argument("--rate", default="20mbit", help="each link's limit, both ways (e.g. 20mbit; none)")
    up.add_argument("--subnet", default="10.77.0.0/24", help="addresses of the workers")
    common(up)
    up.set_defaults(func=_cmd_up)
    down = actions.add_parser("down", help="remove the namespaces and the bridge")
    common(down)
    down.set_defaults(func=_cmd_down)
    run = actions.add_parser("run", help="run a command inside worker i's namespace")
    run.add_argument("worker", type=int)
    run.add_argument("command", nargs=argparse.REMAINDER)
    common(run)
    run.set_defaults(func=_cmd_run)
    stats = actions.add_parser("stats", help="bytes each worker sent and received")
    common(stats)
    stats.set_defaults(func=_cmd_stats)
    from shoal.launch.netbed_sites import register_sites  # `shoal netbed sites ...`
    register_sites(actions)
