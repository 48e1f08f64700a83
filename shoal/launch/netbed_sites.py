"""Sites on one machine: one network namespace per site, a slow and distant WAN between them, an attacker on it.

    site a ns                          WAN router ns                         site b ns
    lo: its workers, store, Gloo       s0 10.79.1.1   s1 10.79.2.1           lo: its workers, store, Gloo
    wan0 10.79.1.2 ==== wire ======== (forwards) ========== wire ==== wan0 10.79.2.2
                                       x0 10.79.250.1
                                        | veth (no limit, no delay)
                                   attacker ns: eth0 10.79.250.2

Each site is one host: its workers meet on its loopback (`sites.internal`'s default), its
leader listens on its WAN address (`sites.listen`). Each wire joins a site's `wan0` to the
router through shoal/launch/netwire.py, which holds every packet rtt/4 each way (this kernel
has no `netem`), so a packet from one site to another is held rtt/2 and a round trip takes
`rtt`; `tc tbf` limits each site's upload and download to `rate`, as on one slow link per site.
The attacker reaches every site's WAN address through the router, and nothing else.
Bytes are the kernel's counters of the router's end of each site's wire.

    with SitesNetbed(["a", "b"], rate="20mbit", rtt="100ms") as bed:
        proc = bed.spawn("a", ["shoal", "run", ..., f"sites.listen={bed.address('a')}:7443"])
        scan = bed.spawn("attacker", ["python", "scan.py", bed.address("a")])
        bed.cut("b"); bed.mend("b")                   # b's link goes down, and comes back
        sent, received = bed.counters("a")

It needs root and iproute2; the context manager (or `shoal netbed sites down`) removes it all.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from shoal.config import SITE_NAME
from shoal.launch.netns import NetbedError, check_host as _check_host, parse_rate, run as _run

__all__ = ["ATTACKER", "SitesNetbed", "parse_rtt", "register_sites", "remove"]

ATTACKER = "attacker"
"""The name `spawn` and `address` take for the attacker's namespace."""
_ATTACKER_NET = 250  # the attacker's /24 within the bed's subnet
_WIRE_START_SECONDS = 30


def parse_rtt(text: str) -> float:
    """'100ms' -> 0.1 (seconds of round trip between two sites)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s)\s*", text.lower())
    if not match:
        raise NetbedError(f"rtt '{text}' must look like 100ms or 0.1s")
    return float(match.group(1)) / (1000 if match.group(2) == "ms" else 1)


class SitesNetbed:
    """Sites, each a namespace behind its own slow link to a WAN router, plus an attacker on the WAN."""

    def __init__(self, sites: Sequence[str], rate: str | None = "20mbit", rtt: str = "100ms", *,
                 prefix: str = "sites", subnet: str = "10.79.0.0/16"):
        if len(sites) < 2 or len(set(sites)) != len(sites):
            raise NetbedError(f"--sites {','.join(sites)}: name two or more different sites")
        for name in sites:
            if not re.fullmatch(SITE_NAME, name) or name == ATTACKER or len(name) > 32:
                raise NetbedError(f"--sites: '{name}' must be letters, digits, '.', '_' or '-' (and not "
                                  f"'{ATTACKER}')")
        if not re.fullmatch(r"[a-z][a-z0-9]{0,11}", prefix):
            raise NetbedError(f"prefix '{prefix}' must be 1-12 lowercase letters or digits")
        self.sites = sorted(sites)  # addresses follow the names' order: the same bed from the same names
        self.rate_bits = parse_rate(rate) if rate else None
        self.rtt = parse_rtt(rtt)
        self.prefix = prefix
        self.network = ipaddress.ip_network(subnet)
        if self.network.prefixlen > 16 or len(self.sites) >= _ATTACKER_NET:
            raise NetbedError(f"subnet {subnet} must be a /16 or larger, for up to {_ATTACKER_NET - 1} sites")
        self.router = f"{prefix}-wan"
        self._wire: subprocess.Popen | None = None
        self._old_sigterm: Any = None

    # -- names and addresses ---------------------------------------------------------------------
    def namespace(self, site: str) -> str:
        return f"{self.prefix}-{ATTACKER}" if site == ATTACKER else f"{self.prefix}-site-{site}"

    def _net(self, site: str) -> int:
        return _ATTACKER_NET if site == ATTACKER else self.sites.index(site) + 1

    def address(self, site: str) -> str:
        """The site's (or the attacker's) address on the WAN."""
        return str(self.network.network_address + self._net(site) * 256 + 2)

    def _router_address(self, site: str) -> str:
        return str(self.network.network_address + self._net(site) * 256 + 1)

    def router_link(self, site: str) -> str:
        """The router's end of the site's wire: its counters are the site's bytes."""
        return f"s{self.sites.index(site)}"

    # -- building and removing -------------------------------------------------------------------
    def up(self) -> SitesNetbed:
        """Router, sites, wires, attacker; on any failure everything made so far is removed."""
        _check_host()
        if Path(f"/run/netns/{self.router}").exists():
            raise NetbedError(f"a sites netbed named '{self.prefix}' is already up: run "
                              f"`shoal netbed sites down --prefix {self.prefix}` first")
        try:
            _run("ip", "netns", "add", self.router)
            _run("ip", "-n", self.router, "link", "set", "lo", "up")
            _run("ip", "netns", "exec", self.router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            for site in self.sites:
                self._add_site(site)
            self._add_attacker()
            self._start_wires()
        except BaseException:
            self.down()
            raise
        return self

    def _add_site(self, site: str) -> None:
        ns, router_end = self.namespace(site), self.router_link(site)
        _run("ip", "netns", "add", ns)
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        _run("ip", "-n", ns, "tuntap", "add", "dev", "wan0", "mode", "tun")
        _run("ip", "-n", self.router, "tuntap", "add", "dev", router_end, "mode", "tun")
        _run("ip", "-n", ns, "addr", "add", f"{self.address(site)}/24", "dev", "wan0")
        _run("ip", "-n", self.router, "addr", "add", f"{self._router_address(site)}/24", "dev", router_end)
        _run("ip", "-n", ns, "link", "set", "wan0", "up")
        _run("ip", "-n", self.router, "link", "set", router_end, "up")
        _run("ip", "-n", ns, "route", "add", "default", "via", self._router_address(site))
        if self.rate_bits:  # upload leaves the site's wan0, download leaves the router's end
            self._limit(ns, "wan0")
            self._limit(self.router, router_end)

    def _limit(self, ns: str, device: str) -> None:
        burst = max(self.rate_bits // 8 // 100, 16384)  # 10 ms of traffic; a TUN's packets are at most the MTU
        _run("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", device, "root", "tbf", "rate",
             f"{self.rate_bits}bit", "burst", str(burst), "latency", "200ms")

    def _add_attacker(self) -> None:
        ns = self.namespace(ATTACKER)
        _run("ip", "netns", "add", ns)
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        _run("ip", "-n", self.router, "link", "add", "x0", "type", "veth", "peer", "name", "eth0", "netns", ns)
        _run("ip", "-n", ns, "addr", "add", f"{self.address(ATTACKER)}/24", "dev", "eth0")
        _run("ip", "-n", self.router, "addr", "add", f"{self._router_address(ATTACKER)}/24", "dev", "x0")
        _run("ip", "-n", ns, "link", "set", "eth0", "up")
        _run("ip", "-n", self.router, "link", "set", "x0", "up")
        _run("ip", "-n", ns, "route", "add", "default", "via", self._router_address(ATTACKER))

    def _start_wires(self) -> None:
        wires = [f"{self.namespace(s)}:wan0={self.router}:{self.router_link(s)}" for s in self.sites]
        log = open(Path(tempfile.gettempdir()) / f"shoal-netbed-{self.prefix}-wire.log", "w")
        # In the router's namespace, so that `down` finds it there; its own session outlives `netbed sites up`.
        self._wire = subprocess.Popen(
            ["ip", "netns", "exec", self.router, sys.executable, "-m", "shoal.launch.netwire",
             "--delay-ms", str(self.rtt * 1000 / 4), *wires],
            stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True, start_new_session=True)
        log.close()
        ready = self._wire.stdout.readline().strip()
        self._wire.stdout.close()
        if ready != "wires up":
            self._wire.kill()
            raise NetbedError(f"the WAN's delay line did not start (see {log.name})")

    def down(self) -> None:
        """Stop the delay line and remove every namespace of this prefix; safe to call twice."""
        remove(self.prefix)
        if self._wire is not None:
            try:
                self._wire.wait(10)
            except subprocess.TimeoutExpired:
                self._wire.kill()
                self._wire.wait(10)
            self._wire = None

    # -- using it -----------------------------------------------------------------------------------
    def spawn(self, site: str, argv: Sequence[str], **popen: Any) -> subprocess.Popen:
        """Start `argv` inside `site`'s namespace (or the attacker's: `ATTACKER`)."""
        return subprocess.Popen(["ip", "netns", "exec", self.namespace(site), *argv], **popen)

    def cut(self, site: str) -> None:
        """Take the site's link down at the router: its packets go nowhere, the others' get 'unreachable'."""
        _run("ip", "-n", self.router, "link", "set", self.router_link(site), "down")

    def mend(self, site: str) -> None:
        """Bring a cut link back."""
        _run("ip", "-n", self.router, "link", "set", self.router_link(site), "up")

    def counters(self, site: str) -> tuple[int, int]:
        """(bytes the site sent, bytes it received) over its link so far, IP headers included."""
        shown = json.loads(_run("ip", "-j", "-s", "-n", self.router, "link", "show", "dev",
                                self.router_link(site)).stdout)[0]["stats64"]
        return shown["rx"]["bytes"], shown["tx"]["bytes"]

    def __enter__(self) -> SitesNetbed:
        import threading
        if threading.current_thread() is threading.main_thread():
            self._old_sigterm = signal.signal(signal.SIGTERM, _raise_interrupt)  # so that __exit__ runs
        return self.up()

    def __exit__(self, *exc_info: Any) -> None:
        self.down()
        if self._old_sigterm is not None:
            signal.signal(signal.SIGTERM, self._old_sigterm)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def remove(prefix: str) -> None:
    """Stop the delay line of the sites netbed `prefix` and delete its namespaces."""
    router = f"{prefix}-wan"
    for pid in _run("ip", "netns", "pids", router, check=False).stdout.split():
        try:  # the delay line (shoal/launch/netwire.py) is what runs in the router's namespace
            os.kill(int(pid), signal.SIGTERM)
        except (ProcessLookupError, ValueError):
            pass
    pattern = re.compile(rf"{re.escape(prefix)}-(wan|{ATTACKER}|site-.+)")
    for line in _run("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split(" ")[0]
        if pattern.fullmatch(name):
            _run("ip", "netns", "delete", name, check=False)


def _existing(prefix: str) -> SitesNetbed:
    """The bed that `shoal netbed sites up --prefix PREFIX` left, from its namespaces' names."""
    _check_host()
    marker = f"{prefix}-site-"
    names = [line.split(" ")[0][len(marker):] for line in _run("ip", "netns", "list", check=False).stdout.splitlines()
             if line.startswith(marker)]
    if not Path(f"/run/netns/{prefix}-wan").exists() or len(names) < 2:
        raise NetbedError(f"no sites netbed '{prefix}' is up: run `shoal netbed sites up` first")
    return SitesNetbed(names, None, "0ms", prefix=prefix)


def _cmd_up(args: argparse.Namespace) -> int:
    sites = [name.strip() for name in args.sites.split(",") if name.strip()]
    bed = SitesNetbed(sites, None if args.rate == "none" else args.rate, args.rtt, prefix=args.prefix,
                      subnet=args.subnet).up()
    for site in bed.sites:
        print(f"site {site}: namespace {bed.namespace(site)}  address {bed.address(site)}  rate {args.rate}")
    print(f"attacker: namespace {bed.namespace(ATTACKER)}  address {bed.address(ATTACKER)}")
    print(f"between two sites: round trip {args.rtt} added (shoal/launch/netwire.py, in {bed.router})")
    print(f"run in a site: shoal netbed sites run --prefix {args.prefix} {bed.sites[0]} -- <command>; "
          f"remove: shoal netbed sites down --prefix {args.prefix}")
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    _check_host()
    remove(args.prefix)
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    bed = _existing(args.prefix)
    if args.site != ATTACKER and args.site not in bed.sites:
        raise NetbedError(f"no site '{args.site}' in netbed '{args.prefix}' (sites: {', '.join(bed.sites)}, "
                          f"or {ATTACKER})")
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise NetbedError("netbed sites run needs a command after --")
    return bed.spawn(args.site, command).wait()


def _cmd_link(args: argparse.Namespace) -> int:
    bed = _existing(args.prefix)
    if args.site not in bed.sites:
        raise NetbedError(f"no site '{args.site}' in netbed '{args.prefix}' (sites: {', '.join(bed.sites)})")
    (bed.cut if args.netbed_sites_command == "cut" else bed.mend)(args.site)
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    bed = _existing(args.prefix)
    for site in bed.sites:
        sent, received = bed.counters(site)
        print(f"site {site}: sent {sent} bytes, received {received} bytes")
    return 0


def register_sites(netbed_actions: Any) -> None:
    """Add `shoal netbed sites up|down|run|cut|mend|stats` under `shoal netbed`."""
    sites = netbed_actions.add_parser("sites", help="sites behind slow, distant links, and an attacker (needs root)",
                                      description=__doc__.split("\n\n")[0])
    actions = sites.add_subparsers(dest="netbed_sites_command", required=True)

    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--prefix", default="sites", help="start of the namespaces' names")

    up = actions.add_parser("up", help="one namespace per site, a WAN router between them, an attacker")
    up.add_argument("--sites", required=True, help="the sites' names, e.g. a,b,c")
    up.add_argument("--rate", default="20mbit", help="each site's link, both ways (e.g. 20mbit; none)")
    up.add_argument("--rtt", default="100ms", help="round trip added between two sites (e.g. 100ms)")
    up.add_argument("--subnet", default="10.79.0.0/16", help="the WAN's addresses")
    common(up)
    up.set_defaults(func=_cmd_up)
    down = actions.add_parser("down", help="stop the delay line, remove the namespaces")
    common(down)
    down.set_defaults(func=_cmd_down)
    run = actions.add_parser("run", help=f"run a command in a site's namespace (or the {ATTACKER}'s)")
    run.add_argument("site")
    run.add_argument("command", nargs=argparse.REMAINDER)
    common(run)
    run.set_defaults(func=_cmd_run)
    for action, what in (("cut", "take a site's link down"), ("mend", "bring a cut link back")):
        link = actions.add_parser(action, help=what)
        link.add_argument("site")
        common(link)
        link.set_defaults(func=_cmd_link)
    stats = actions.add_parser("stats", help="bytes each site sent and received over its link")
    common(stats)
    stats.set_defaults(func=_cmd_stats)
