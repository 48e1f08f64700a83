"""Failures and slow links: what they do to a run, in closed form.

Goodput under failures (`--mtbf DURATION --checkpoint-every K`): the share of wall time that
trains. With a checkpoint every K steps of t seconds (interval tau = K t) costing C seconds,
failures of the whole job every M seconds on average, and R seconds to come back:

- restart from checkpoint (torchrun --max-restarts, a scheduler requeue): each failure
  loses R plus, on average, half an interval of work and half a save (Young, "A first order
  approximation to the optimum checkpoint interval", CACM 1974; Daly, FGCS 2006):
      G = tau / (tau + C) * (1 - (R + (tau + C) / 2) / M)
- per-step recovery (fault.enabled): survivors regroup in r seconds and lose at most the
  step in flight, half a step on average; they then train the same global batch without the
  lost worker, at t' seconds a step, until its replacement has started (D seconds) and joined
  (a second regroup). For a share f = min(1, D / M) of the time the run is short of a worker:
      G = tau / (tau + C) * (1 - (2 r + t / 2) / M + f (t / t' - 1))
  On a cluster t' > t (each survivor takes a larger share of the batch); on a host with fewer
  cores than workers t' can be < t, and the run trains faster while it is short.

Slow links between sites (`--link 20mbit --rtt 100ms --sites 3`): a ring all-reduce over s
sites moves 2(s-1)/s of the buffer through each site's link in 2(s-1) steps of half a
round trip. What a link carries is frames, not payload (`on_the_wire`): TCP over IPv4 on
1500-byte Ethernet carries 1448 bytes a segment under 66 of headers, and each site also sends
one 66-byte ACK per two segments of what it receives (as much as it sends, in these
collectives), 6.8% in all. DDP pays it every step on the gradients; DiLoCo (Douillard et al., "DiLoCo:
Distributed Low-Communication Training of Language Models", 2023) once every H steps on the
pseudo-gradient, smaller again under its encodings (fp4: 4 bits and a scale per 64 values;
top-k: the kept fraction at its bits plus a 12-bit index).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from shoal.config import ConfigError

_DURATION = {"s": 1, "m": 60, "h": 3600, "d": 86400, "ms": 1e-3, "us": 1e-6}
_RATE = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bps": 1, "kbps": 1e3, "mbps": 1e6, "gbps": 1e9}


def parse_duration(text: str, option: str) -> float:
    """'6h', '30m', '100ms', '2d', '45' (seconds) -> seconds."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*(ms|us|s|m|h|d)?\s*", text.lower())
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(f"{option} {text!r} is not a positive duration like 6h, 30m, 90s or 100ms")
    return float(match.group(1)) * _DURATION[match.group(2) or "s"]


def parse_rate(text: str, option: str = "--link") -> float:
    """'20mbit', '1gbit', '500kbit' -> bytes per second (tc's units: bits)."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*(bit|kbit|mbit|gbit|bps|kbps|mbps|gbps)\s*", text.lower())
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(f"{option} {text!r} is not a link rate like 20mbit, 1gbit or 500kbit")
    return float(match.group(1)) * _RATE[match.group(2)] / 8


def restart_goodput(step_s: float, every: int, checkpoint_s: float, restart_s: float, mtbf_s: float) -> float:
    tau = every * step_s
    return max(0.0, tau / (tau + checkpoint_s) * (1 - (restart_s + (tau + checkpoint_s) / 2) / mtbf_s))


def per_step_goodput(step_s: float, every: int, checkpoint_s: float, regroup_s: float, mtbf_s: float,
                     short_step_s: float | None = None, replace_s: float = 0.0) -> float:
    """Per-step recovery's goodput; `short_step_s` (t') is the step without the lost worker, taken for
    `replace_s` (D) seconds after each failure. Without them the run is taken never to be short."""
    tau = every * step_s
    short = min(1.0, replace_s / mtbf_s) * (step_s / short_step_s - 1) if short_step_s else 0.0
    regroups = 2 if short_step_s else 1
    return max(0.0, tau / (tau + checkpoint_s) * (1 - (regroups * regroup_s + step_s / 2) / mtbf_s + short))


def best_interval(step_s: float, checkpoint_s: float, mtbf_s: float) -> int:
    """Young's optimum sqrt(2 C M), in steps."""
    return max(1, round((2 * checkpoint_s * mtbf_s) ** 0.5 / step_s))


@dataclass(frozen=True)
class LinkRow:
    method: str
    step_s: float
    """Seconds per optimizer step, communication included (not overlapped)."""
    bytes_per_step: float
    """Bytes each site sends per step (averaged over H for DiLoCo)."""


SEGMENT_PAYLOAD, FRAME_HEADERS = 1448, 66
"""TCP payload of a full segment on 1500-byte Ethernet with TCP timestamps, and the headers around
it: Ethernet 14 + IPv4 20 + TCP 20 + timestamp option 12 (what an interface's byte counter sees)."""


def on_the_wire(payload: float) -> float:
    """Bytes a site's link carries to send `payload` bytes in bulk while receiving as much: full
    segments with their headers, and one ACK frame per two segments received (Linux's delayed ACK)."""
    return payload * (1 + FRAME_HEADERS / SEGMENT_PAYLOAD + FRAME_HEADERS / (2 * SEGMENT_PAYLOAD))


def ring_all_reduce_seconds(nbytes: float, sites: int, rate: float, rtt_s: float) -> float:
    if sites <= 1:
        return 0.0
    return on_the_wire(2 * (sites - 1) / sites * nbytes) / rate + 2 * (sites - 1) * rtt_s / 2


def link_rows(compute_s: float, grad_bytes: float, sites: int, rate: float, rtt_s: float,
              inner_steps: int, topk_fraction: float = 0.02, topk_bits: int = 2) -> list[LinkRow]:
    """DDP against DiLoCo (each encoding) over `sites` sites joined by links of `rate` bytes/s."""
    rows = [LinkRow("ddp (all-reduce every step)", compute_s + ring_all_reduce_seconds(grad_bytes, sites, rate, rtt_s),
                    on_the_wire(2 * (sites - 1) / sites * grad_bytes))]
    for encoding, ratio in (("none", 1.0), ("fp4", 0.125 + 1 / 64),
                            ("topk", topk_fraction * (topk_bits + 12) / 32)):
        sent = grad_bytes * ratio
        outer = ring_all_reduce_seconds(sent, sites, rate, rtt_s)
        rows.append(LinkRow(f"diloco H={inner_steps} {encoding}", compute_s + outer / inner_steps,
                            on_the_wire(2 * (sites - 1) / sites * sent) / inner_steps))
    for bits in (8, 4):  # DiLoCo's default int8 (and int4): every site's codes and scales all-gathered
        from shoal.sync.compress import BLOCK
        payload = grad_bytes * (bits / 32 + 1 / BLOCK)
        outer = all_gather_seconds(payload, sites, rate, rtt_s)
        rows.append(LinkRow(f"diloco H={inner_steps} int{bits}", compute_s + outer / inner_steps,
                            on_the_wire((sites - 1) * payload) / inner_steps))
    return rows


def all_gather_seconds(payload: float, sites: int, rate: float, rtt_s: float) -> float:
    """Each of `sites` sites' `payload` bytes to every other (shoal/sync/compress.py's
    quantized all-reduce): a ring passes s-1 payloads through each link, in s-1 steps."""
    return (sites - 1) * (on_the_wire(payload) / rate + rtt_s / 2)
