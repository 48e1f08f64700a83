"""One site's plane alone in its own process, for tests that stop or kill a site (no training).

`python -m tests.sites.plane_site CERTS NAME PORT PEER=PORT LIMIT`: listens on loopback, links with
the peer, exchanges outer round 1 with it, prints what it saw, then holds its link until its stdin
closes.
"""

from __future__ import annotations

import sys
from pathlib import Path

from shoal.sites.plane import SitePlane


def main() -> None:
    certs, name, port, peer, limit = sys.argv[1:6]
    peer_name, peer_port = peer.split("=")
    plane = SitePlane(name=name, listen=("127.0.0.1", int(port)), peers={peer_name: ("127.0.0.1", int(peer_port))},
                      certs_dir=Path(certs), grace_seconds=60, limit=int(limit))
    plane.start()
    plane.wait_for_links(60)
    print("linked" if plane.linked() else "not linked", flush=True)
    result = plane.exchange(1, f"{name}-round-1".encode())
    print("round 1:", ", ".join(result.payloads), flush=True)
    sys.stdin.read()
    plane.close()


if __name__ == "__main__":
    main()
