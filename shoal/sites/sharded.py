"""The outer average of 3 sites or more in two phases, so that it moves the bytes of a ring all-reduce.

At 2 sites each site sends its whole outer gradient to the other (CONTRIB) and averages for itself:
one copy of the gradient per site, as Gloo's ring. At n sites that would be n - 1 copies per site,
where the ring sends 2(n - 1)/n. So from `wire.SHARDED_FROM` sites on, an fp32 round goes as the
ring's two halves, over the plane's own mutual-TLS links (Gloo's TLS transport is not in the torch
CPU wheel, so Gloo's collectives cannot cross between sites):

1. reduce-scatter: the flat outer gradient is cut into one contiguous shard per site of the round
   (in name order, as `torch.tensor_split` cuts); each site sends each other site that site's shard
   (SHARD), and the shard's owner averages the shards that came within `sites.grace_seconds`;
2. all-gather: each owner sends its averaged shard (AVERAGE) to the sites whose shard it averaged,
   and each site assembles the round's average from the averaged shards.

Every site thus sends (n - 1)/n of the gradient in each phase. A site whose shard or averaged shard
has not come within the grace window (each phase waits at most that long) is dropped from the round,
told and disconnected, as in the whole exchange. An owner lost between the phases leaves its shard's
average missing, and its values in every other shard's average: the surviving sites then send each
other their own values of the missing shards and their own shard's average again without the lost
owners (REPAIR, only on that failure), and average the missing shards alike, so they end the round
with the same model, the survivors' average and nothing of the lost owners (whose steps the round's
map then rightly lacks); a survivor whose view differs ends with another model and the digests at
the next round settle it (the later name takes the earlier's state). The frames carry the digest of
the outer model the sender starts from and the sites it counts in the round, so shards cut for
another layout are never mixed.

Ring all-reduce's 2(n - 1)/n: Patarasuk and Yuan 2009, "Bandwidth optimal all-reduce algorithms for
clusters of workstations", J. Parallel Distrib. Comput. 69(2).
"""

from __future__ import annotations

import logging
import struct
import time
from dataclasses import dataclass, field
from typing import Callable

from shoal.sites import wire
from shoal.sites.peers import PeerView

log = logging.getLogger("shoal.sites")
Mean = Callable[[dict[str, bytes]], bytes]
"""The average of equal-length rows of values, summed in the order given (site-name order)."""
NAMES = struct.Struct("!H")  # length of the comma-joined site names that follow


@dataclass
class RoundResult:
    """One round's outer gradients as received, and what this site must do after the round."""

    payloads: dict[str, bytes]  # site name -> its payload, this site's own included (the whole exchange)
    resync_from: str | None  # a site whose state this site must take after the round
    average: bytes | None = None  # the round's average, assembled from shards (the sharded exchange)
    members: list[str] = field(default_factory=list)  # the sites in this round's average, this one included
    steps: dict[str, int] = field(default_factory=dict)  # each member's inner step at the round (lineage.py)


def shard_bounds(total_bytes: int, itemsize: int, sites: list[str]) -> dict[str, tuple[int, int]]:
    """Each site's contiguous byte range of the flat payload, in name order; the first `numel % n` shards
    hold one value more (as `torch.tensor_split`)."""
    numel, count = total_bytes // itemsize, len(sites)
    bounds, start = {}, 0
    for index, site in enumerate(sorted(sites)):
        stop = start + numel // count + (1 if index < numel % count else 0)
        bounds[site] = (start * itemsize, stop * itemsize)
        start = stop
    return bounds


def names_header(digest: bytes, names: list[str]) -> bytes:
    """The head of a shard frame: the outer model the sender starts from and the sites it counts."""
    joined = ",".join(names).encode()
    return digest + NAMES.pack(len(joined)) + joined


class ShardedRounds:
    """The sharded exchange, a mixin of `SitePlane` (its links, inbox, drops and digests)."""

    name: str
    grace: float
    digest: bytes
    inbox: dict[tuple[int, int, str], bytes]
    members: set[str]

    def exchange_sharded(self, round_: int, targets: list[PeerView], started: float, payload: bytes,
                         itemsize: int, mean: Mean, step: int = 0) -> RoundResult:
        """Round `round_` with `targets` (the sites in step with this one) as reduce-scatter + all-gather;
        `step`: this site's inner step, sent with its shards."""
        order = sorted([self.name, *(p.name for p in targets)])
        bounds = shard_bounds(len(payload), itemsize, order)
        head = names_header(self.digest, order)

        def shard(site: str) -> bytes:
            lo, hi = bounds[site]
            return payload[lo:hi]

        for peer in targets:  # 1. reduce-scatter: each site its own shard of this site's gradient
            self._send(peer, wire.SHARD, round_, head + wire.STEP.pack(step) + shard(peer.name))
        got = self._collect(wire.SHARD, round_, targets, started + self.grace)
        resync = self._diverged(round_)
        rows, steps = {self.name: shard(self.name)}, {self.name: step}
        body = len(head) + wire.STEP.size  # where a shard's values start
        for peer in targets:
            frame = got.get(peer.name)
            if self._dropped_me(round_, peer.name):
                continue
            if frame is None:
                self._drop_from_round(peer, round_, started, "outer shard")
            elif not frame.startswith(head):  # another model, or other sites in its round: not mixed
                log.warning("site %s: left site %s's shard out of outer round %d: it started from another model "
                            "or counts other sites in the round", self.name, peer.name, round_)
                if frame[:wire.DIGEST_BYTES] != self.digest and peer.name < self.name:
                    resync = resync or peer.name
            elif len(frame) - body != len(rows[self.name]):
                log.warning("site %s: left site %s's shard out of outer round %d: %d bytes, expected %d", self.name,
                            peer.name, round_, len(frame) - body, len(rows[self.name]))
            else:
                (steps[peer.name],) = wire.STEP.unpack_from(frame, len(head))
                rows[peer.name] = frame[body:]
        averaged = mean(dict(sorted(rows.items())))
        partners = [p for p in targets if p.name in rows]
        for peer in partners:  # 2. all-gather: the averaged shard to the sites averaged in it
            self._send(peer, wire.AVERAGE, round_, self.digest + averaged)
        gathered_from = time.monotonic()
        got = self._collect(wire.AVERAGE, round_, partners, gathered_from + self.grace)
        pieces = {self.name: averaged}
        for peer in partners:
            frame = got.get(peer.name)
            if self._dropped_me(round_, peer.name):
                continue
            if (frame is None or frame[:wire.DIGEST_BYTES] != self.digest
                    or len(frame) - wire.DIGEST_BYTES != len(shard(peer.name))):
                self._drop_from_round(peer, round_, gathered_from, "averaged shard")
            else:
                pieces[peer.name] = frame[wire.DIGEST_BYTES:]
        with self.cond:
            dropped_me = sorted(p for p in self.peers if self.inbox.get((wire.DROP, round_, p)) is not None)
        missing = [site for site in order if site not in pieces]
        if missing and not dropped_me:  # this site's average is taken from another site's state otherwise
            mine = mean(dict(sorted((site, row) for site, row in rows.items() if site not in missing)))
            pieces.update(self._repair(round_, missing, [p for p in partners if p.name in pieces], shard, mean,
                                       mine))
        with self.cond:
            for site in dropped_me:
                self.inbox.pop((wire.DROP, round_, site), None)
            self._forget_round(round_)
        members = sorted(set(pieces) - set(missing))  # the repaired shards' owners are not in it
        self.members = set(members) - {self.name}
        if dropped_me:
            resync = resync or dropped_me[0]
            log.warning("site %s: site(s) %s left this site out of outer round %d; taking their state", self.name,
                        ", ".join(dropped_me), round_)
            return RoundResult({self.name: payload}, resync, payload, [self.name], {self.name: step})
        return RoundResult({self.name: payload}, resync, b"".join(pieces[site] for site in order), members,
                           {site: steps[site] for site in members})

    def _repair(self, round_: int, missing: list[str], survivors: list[PeerView], shard: Callable[[str], bytes],
                mean: Mean, mine: bytes) -> dict[str, bytes]:
        """The round's shards among the survivors alone, the `missing` owners lost between the phases: each
        sends the others its own values of the missing shards and `mine`, its own shard averaged again without
        them; each averages the missing shards alike. The survivors' averaged shards, by site (this one's
        `mine`); a survivor whose repair does not come keeps the average it sent in the all-gather."""
        names = [p.name for p in survivors]
        log.warning("site %s: the averaged shard(s) of site(s) %s did not come in outer round %d; re-averaging "
                    "them with site(s) %s", self.name, ", ".join(missing), round_, ", ".join(names) or "none")
        self.event("site_shard_repaired", round=round_, owners=missing, sites=[self.name, *names])
        head = names_header(self.digest, missing)
        for peer in survivors:
            self._send(peer, wire.REPAIR, round_, head + b"".join(shard(site) for site in missing) + mine)
        started = time.monotonic()
        got = self._collect(wire.REPAIR, round_, survivors, started + self.grace)
        rows: dict[str, list[bytes]] = {self.name: [shard(site) for site in missing]}
        again = {self.name: mine}
        for peer in survivors:
            frame = got.get(peer.name)
            expected = len(head) + sum(len(shard(site)) for site in [*missing, peer.name])
            if frame is None or not frame.startswith(head) or len(frame) != expected:
                # Not dropped: it may hold the owner's average (its view differs); the digests settle it.
                log.warning("site %s: no matching repair from site %s in outer round %d within %.1f s; the two "
                            "may end the round apart (settled at the next round)", self.name, peer.name, round_,
                            time.monotonic() - started)
                continue
            body, offset = frame[len(head):], 0
            rows[peer.name] = []
            for site in missing:
                size = len(shard(site))
                rows[peer.name].append(body[offset:offset + size])
                offset += size
            again[peer.name] = body[offset:]
        ordered = dict(sorted(rows.items()))
        return again | {site: mean({name: values[index] for name, values in ordered.items()})
                        for index, site in enumerate(missing)}

    def _collect(self, kind: int, round_: int, peers: list[PeerView], deadline: float) -> dict[str, bytes]:
        """Wait until each of `peers` has sent its `kind` frame of `round_`, said DROP or lost its link, or until
        `deadline`; the frames that came, by site."""
        with self.cond:
            while True:
                waiting = [p for p in peers if p.link is not None and (kind, round_, p.name) not in self.inbox
                           and (wire.DROP, round_, p.name) not in self.inbox]
                left = deadline - time.monotonic()
                if not waiting or left <= 0:
                    break
                self.cond.wait(left)
            return {p.name: self.inbox.pop((kind, round_, p.name)) for p in peers
                    if (kind, round_, p.name) in self.inbox}

    def _dropped_me(self, round_: int, site: str) -> bool:
        with self.cond:
            return (wire.DROP, round_, site) in self.inbox
