"""What one site's leader knows of each other site on the cross-site plane (shoal/sites/plane.py),
shared by the plane and its sharded exchange (shoal/sites/sharded.py)."""

from __future__ import annotations

import ssl
from collections import deque
from dataclasses import dataclass, field


@dataclass
class PeerView:
    """What this site knows of one other site."""

    name: str
    host: str
    port: int
    link: ssl.SSLSocket | None = None
    outbox: deque[tuple[int, int, bytes, bool]] = field(default_factory=deque)  # (kind, round, payload, close after)
    sending_since: float | None = None  # when the frame its sender is writing now was started
    status: tuple[int, bytes] | None = None  # (completed rounds, outer-model digest) it last reported
    joining: bool = False  # it asked for our state after our next round
    refusal: str = ""  # why its last certificate was refused, logged once
