"""What both network test beds (netbed.py, netbed_sites.py) need: their error, the host check, `ip`/`tc` calls, rates."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

from shoal.config import ConfigError

__all__ = ["NetbedError", "check_host", "parse_rate", "run"]

_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}


class NetbedError(ConfigError):
    """The test bed cannot be built here (no root, no iproute2, bad rate)."""


def parse_rate(text: str) -> int:
    """'20mbit' -> 20_000_000 bits/s. Only bit units: tc's 'mbps' means megabytes, a common trap."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(bit|kbit|mbit|gbit)\s*", text.lower())
    if not match:
        raise NetbedError(f"rate '{text}' must look like 20mbit (units: {', '.join(_UNITS)})")
    bits = int(float(match.group(1)) * _UNITS[match.group(2)])
    if bits < 8000:
        raise NetbedError(f"rate '{text}' is below 8kbit, too slow for a TCP handshake to finish")
    return bits


def check_host() -> None:
    """NetbedError unless iproute2 is installed and this process is root."""
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise NetbedError(f"netbed needs {' and '.join(missing)} from iproute2 "
                          f"(apt-get install iproute2)")
    if os.geteuid() != 0:
        raise NetbedError("netbed needs root to create network namespaces and set tc limits "
                          "(run as root, or with sudo)")


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run an `ip`/`tc` command; NetbedError with its message when it fails and `check`."""
    result = subprocess.run(argv, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise NetbedError(f"`{' '.join(argv)}` failed: {result.stderr.strip() or result.stdout.strip()}")
    return result
