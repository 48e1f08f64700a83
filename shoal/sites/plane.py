"""The cross-site plane: one site leader's mutual-TLS links to the other sites, and the outer rounds over them.

Each site's leader listens on `sites.listen`; of two sites the one whose name sorts first dials the
other, so every pair holds one link, re-dialled whenever it is down. On every link the two leaders
say where they stand (STATUS: completed outer rounds and a digest of their outer model), send each
round's outer gradient (CONTRIB; from 3 sites on in shards, sharded.py: a reduce-scatter, then an
all-gather of the averaged shards), and hand a joining site the state it needs (JOIN, STATE).

Every link has its own sender thread, so no wait on the plane hangs on a send: a link that goes
silent (cut, or its site stopped) stops taking bytes once the socket buffers are full, and a
blocking send of an outer gradient larger than them would wait until TCP gives up (minutes). A
frame that has waited `sites.grace_seconds` to be sent means the link is silent, and the site is
dropped as one whose outer gradient did not come.

Membership is decided per round by each site from what it sees, within `sites.grace_seconds`:
a site whose link is down is not waited for; one whose outer gradient has not come when the grace
window ends is dropped from this round's average, told so (DROP) and disconnected; a site behind
the others (restarted, or dropped) asks a site ahead of it for its state after that site's next
round and continues from there. Two sites that ended a round with different models (a link cut
between the two halves of an exchange) see it in each other's digest and the one whose name
sorts later takes the other's state, so the sites never stay apart.
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Callable

from shoal.config import ConfigError
from shoal.sites import wire
from shoal.sites.peers import PeerView
from shoal.sites.sharded import Mean, RoundResult, ShardedRounds

log = logging.getLogger("shoal.sites")
DIGEST_BYTES = wire.DIGEST_BYTES
REDIAL_SECONDS = 0.5


class SitePlane(ShardedRounds):
    """One site leader's end of the plane: listener, dialler, links and the outer-round exchange.

    `limit`: the largest payload accepted, per frame kind (`wire.message_limits`) or one for every kind.
    """

    def __init__(self, *, name: str, listen: tuple[str, int], peers: dict[str, tuple[str, int]], certs_dir: Path,
                 grace_seconds: float, limit: dict[int, int] | int, events: Callable[..., None] | None = None):
        self.name, self.listen, self.certs_dir = name, listen, certs_dir
        self.grace, self.limit = grace_seconds, limit
        self.peers = {p: PeerView(p, host, port) for p, (host, port) in sorted(peers.items())}
        self.event = events or (lambda kind, **fields: None)
        self.cond = threading.Condition()
        self.inbox: dict[tuple[int, int, str], bytes] = {}
        self.rounds = 0  # outer rounds this site has completed
        self.members: set[str] = set()  # the other sites in the last round's average
        self.digest = bytes(DIGEST_BYTES)
        # Frames and payload bytes by kind, this site's and the other sites' (logged at close: where the bytes go).
        self.traffic = {way: {kind: [0, 0] for kind in wire.KIND_NAMES} for way in ("sent", "received")}
        self._stopped = threading.Event()
        self._server: socket.socket | None = None
        wire.server_context(certs_dir, name)  # fail at start on missing certificates or a bad CRL

    # -- links ----------------------------------------------------------------------------
    def start(self) -> None:
        self._server = socket.create_server(self.listen, reuse_port=False)
        self._server.settimeout(0.5)
        threading.Thread(target=self._accept_loop, daemon=True, name="sites-accept").start()
        threading.Thread(target=self._dial_loop, daemon=True, name="sites-dial").start()
        log.info("site %s: listening on %s:%d (mutual TLS 1.3) for %s", self.name, *self.listen,
                 ", ".join(self.peers))

    def close(self) -> None:
        """Send what is queued (the last round's outer gradient may still be on its way; at most the grace
        window), log the frames by kind, and take every link down."""
        deadline = time.monotonic() + self.grace
        with self.cond:
            while any(p.link is not None and (p.outbox or p.sending_since is not None) for p in self.peers.values()):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
            summary = "; ".join(
                f"{way} " + ", ".join(f"{count} {wire.KIND_NAMES[kind]} ({size / 1e6:.2f} MB)"
                                      for kind, (count, size) in by_kind.items() if count)
                for way, by_kind in self.traffic.items())
        log.info("site %s: frames over the plane: %s", self.name, summary)
        self.event("site_traffic", **{way: {wire.KIND_NAMES[k]: v for k, v in by_kind.items() if v[0]}
                                      for way, by_kind in self.traffic.items()})
        self._stopped.set()
        if self._server is not None:
            self._server.close()
        for peer in self.peers.values():
            self._disconnect(peer)

    def linked(self) -> list[str]:
        with self.cond:
            return [p.name for p in self.peers.values() if p.link is not None]

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                raw, address = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._handshake_in, args=(raw, address), daemon=True).start()

    def _handshake_in(self, raw: socket.socket, address: tuple) -> None:
        where = f"{address[0]}:{address[1]}"
        try:
            context = wire.server_context(self.certs_dir, self.name)  # the CRL as it is now
        except ConfigError as err:
            log.error("site %s: refused a connection from %s: the revocation list cannot be checked (%s); every "
                      "connection is refused until it is restored", self.name, where, err)
            self.event("site_refused", peer=where, reason=str(err))
            raw.close()
            return
        raw.settimeout(wire.HANDSHAKE_SECONDS)
        try:
            sock = context.wrap_socket(raw, server_side=True)
            name = wire.peer_name(sock)
        except (ssl.SSLError, OSError, wire.Refused) as err:
            log.warning("site %s: refused a connection from %s: %s", self.name, where, err)
            self.event("site_refused", peer=where, reason=str(err))
            raw.close()
            return
        peer = self.peers.get(name)
        if peer is None or name >= self.name:  # of two sites the one whose name sorts first dials
            why = "is not one of sites.peers" if peer is None else "should be dialled by this site, not dial it"
            log.warning("site %s: refused a connection from %s presenting site '%s': that site %s", self.name,
                        where, name, why)
            self.event("site_refused", peer=where, name=name, reason=why)
            sock.close()
            return
        self._attach(peer, sock)

    def _dial_loop(self) -> None:
        while not self._stopped.is_set():
            for peer in self.peers.values():
                if peer.name > self.name and peer.link is None and not self._stopped.is_set():
                    self._dial(peer)
            self._drop_silent_links()
            self._stopped.wait(REDIAL_SECONDS)

    def _dial(self, peer: PeerView) -> None:
        try:
            context = wire.client_context(self.certs_dir, self.name)
        except ConfigError as err:
            log.error("site %s: not dialling site %s: %s", self.name, peer.name, err)
            return
        try:
            sock = wire.connect(peer.host, peer.port, context, wire.HANDSHAKE_SECONDS)
            name = wire.peer_name(sock)
        except (ssl.SSLError, wire.Refused) as err:  # it answered, but not as a site of this job
            if str(err) != peer.refusal:  # once per reason, not every REDIAL_SECONDS
                peer.refusal = str(err)
                log.warning("site %s: refused site %s at %s:%d: %s", self.name, peer.name, peer.host, peer.port, err)
                self.event("site_refused", site=peer.name, reason=str(err))
            return
        except OSError:
            return  # not up (yet): dialled again in REDIAL_SECONDS
        if name != peer.name:
            log.warning("site %s: refused %s:%d: it presented site '%s', where site '%s' listens", self.name,
                        peer.host, peer.port, name, peer.name)
            self.event("site_refused", peer=f"{peer.host}:{peer.port}", name=name, reason=f"expected {peer.name}")
            sock.close()
            return
        self._attach(peer, sock)

    def _attach(self, peer: PeerView, sock: ssl.SSLSocket) -> None:
        sock.settimeout(None)
        with self.cond:
            old, peer.link, peer.status, peer.joining = peer.link, sock, None, False
            peer.outbox.clear()  # frames meant for the old link (its sender sees the new link and ends)
            peer.sending_since = None
            self.members.discard(peer.name)  # a site linked anew is in step only once its status says so
            rounds, digest = self.rounds, self.digest
            self.cond.notify_all()
        if old is not None:
            _shut(old)  # its reader sees the end and closes it
        log.info("site %s: linked with site %s (TLS 1.3, %s)", self.name, peer.name, sock.cipher()[0])
        self.event("site_linked", site=peer.name)
        sender = threading.Thread(target=self._send_loop, args=(peer, sock), daemon=True,
                                  name=f"sites-{peer.name}-send")
        sender.start()
        threading.Thread(target=self._read_loop, args=(peer, sock, sender), daemon=True,
                         name=f"sites-{peer.name}").start()
        self._send(peer, wire.STATUS, rounds, digest)

    def _disconnect(self, peer: PeerView, sock: ssl.SSLSocket | None = None) -> None:
        """Take the peer's link down: shut it (which ends a send or read blocked on it); its reader closes it."""
        with self.cond:
            if peer.link is None or (sock is not None and peer.link is not sock):
                return
            sock, peer.link, peer.status, peer.joining = peer.link, None, None, False
            peer.outbox.clear()
            peer.sending_since = None
            self.cond.notify_all()
        _shut(sock)

    def _send(self, peer: PeerView, kind: int, round_: int, payload: bytes = b"", close_after: bool = False) -> bool:
        """Queue a frame for the peer's sender; False when the peer has no link. Never waits for the network."""
        with self.cond:
            if peer.link is None:
                return False
            peer.outbox.append((kind, round_, payload, close_after))
            self.cond.notify_all()
            return True

    def _send_loop(self, peer: PeerView, sock: ssl.SSLSocket) -> None:
        """Write the link's frames in order; a send blocked past the grace window is ended by `_drop_silent_links`."""
        while True:
            with self.cond:
                while peer.link is sock and not peer.outbox:
                    self.cond.wait()
                if peer.link is not sock:
                    return
                kind, round_, payload, close_after = peer.outbox.popleft()
                peer.sending_since = time.monotonic()
            try:
                wire.write_frame(sock, kind, round_, payload)
            except (OSError, ValueError) as err:
                if not self._stopped.is_set() and peer.link is sock:
                    log.warning("site %s: could not send to site %s: %s", self.name, peer.name, err)
                self._disconnect(peer, sock)
                return
            with self.cond:
                if peer.link is sock:
                    peer.sending_since = None
                self._count("sent", kind, len(payload))
                self.cond.notify_all()  # `close` waits for the queue to drain
            if kind == wire.STATE:
                log.info("site %s: sent site %s the state after outer round %d (%d bytes)", self.name, peer.name,
                         round_, len(payload))
                self.event("site_state_sent", site=peer.name, round=round_, bytes=len(payload))
            if close_after:
                self._disconnect(peer, sock)
                return

    def _count(self, way: str, kind: int, size: int) -> None:
        counted = self.traffic[way][kind]
        counted[0] += 1
        counted[1] += wire.HEADER.size + size

    def _drop_silent_links(self) -> None:
        """Drop the sites whose link has taken no bytes for the grace window (cut, or the site stopped)."""
        now = time.monotonic()
        for peer in self.peers.values():
            with self.cond:
                sock, since = peer.link, peer.sending_since
            if sock is None or since is None or now - since <= self.grace:
                continue
            why = (f"a frame to it waited {now - since:.1f} s to be sent (sites.grace_seconds = {self.grace:g}): "
                   f"its link is silent")
            log.warning("site %s: dropped site %s: %s", self.name, peer.name, why)
            self.event("site_dropped", site=peer.name, round=self.rounds, waited=round(now - since, 3), reason=why)
            self._disconnect(peer, sock)

    def _read_loop(self, peer: PeerView, sock: ssl.SSLSocket, sender: threading.Thread) -> None:
        try:
            while True:
                frame = wire.read_frame(sock, self.limit)
                with self.cond:
                    self._count("received", frame.kind, len(frame.payload))
                    if frame.kind == wire.STATUS:
                        peer.status = (frame.round, frame.payload[:DIGEST_BYTES])
                    elif frame.kind == wire.JOIN:
                        peer.joining = True
                    else:
                        self.inbox[(frame.kind, frame.round, peer.name)] = frame.payload
                    self.cond.notify_all()
        except wire.Refused as err:
            log.warning("site %s: refused site %s's message: %s; disconnected", self.name, peer.name, err)
            self.event("site_refused", site=peer.name, reason=str(err))
        except (OSError, ValueError, ConnectionError):
            if not self._stopped.is_set() and peer.link is sock:
                log.warning("site %s: lost the link to site %s", self.name, peer.name)
                self.event("site_lost", site=peer.name)
        self._disconnect(peer, sock)
        sender.join()  # the shut link ends its send; only then is the socket closed (no other thread uses it)
        try:
            sock.close()
        except OSError:
            pass

    # -- rounds -----------------------------------------------------------------------------
    def wait_for_links(self, seconds: float) -> None:
        """Wait up to `seconds` until every other site is linked and has said where it stands."""
        deadline = time.monotonic() + seconds
        with self.cond:
            while any(p.status is None for p in self.peers.values()):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)

    def ahead(self) -> str | None:
        """A site whose state this one must take: one further on, or at the same round with another model
        and a name that sorts first. None when this site is as far as every site it sees."""
        with self.cond:
            best = None
            for peer in self.peers.values():
                if peer.link is None or peer.status is None:
                    continue
                rounds, digest = peer.status
                if rounds > self.rounds or (rounds == self.rounds and digest != self.digest and peer.name < self.name):
                    if best is None or rounds > best[0]:
                        best = (rounds, peer.name)
            return best[1] if best else None

    def exchange(self, round_: int, payload: bytes, mean: Mean | None = None, itemsize: int = 4, *,
                 step: int = 0) -> RoundResult:
        """Send this site's outer gradient of round `round_` (its inner step then: `step`) to the sites in step
        with it, and collect theirs (with their steps, `RoundResult.steps`).

        Waits at most `grace_seconds`; a site whose gradient has not come by then is dropped from this
        round (told so and disconnected). Sites behind this one or joining are not waited for.
        With `mean` (the average of equal rows of `itemsize`-byte values, in the order given) and
        `wire.SHARDED_FROM` sites or more in the round, the gradient travels in shards
        (`ShardedRounds`) and the result holds the average itself.
        """
        started = time.monotonic()
        with self.cond:
            # The sites of the last round (one may still be finishing it) and those that reported the same model.
            targets = [p for p in self.peers.values() if p.link is not None and not p.joining
                       and (p.name in self.members or p.status == (round_ - 1, self.digest))]
        if mean is not None and len(targets) + 1 >= wire.SHARDED_FROM:
            return self.exchange_sharded(round_, targets, started, payload, itemsize, mean, step)
        mine = self.digest + wire.STEP.pack(step) + payload
        for peer in targets:
            self._send(peer, wire.CONTRIB, round_, mine)  # queued: the grace window starts now, not after the sends
        deadline = started + self.grace
        with self.cond:
            while True:
                waiting = [p for p in targets if p.link is not None and (wire.CONTRIB, round_, p.name) not in
                           self.inbox and (wire.DROP, round_, p.name) not in self.inbox]
                left = deadline - time.monotonic()
                if not waiting or left <= 0:
                    break
                self.cond.wait(left)
            received = {p.name: self.inbox.pop((wire.CONTRIB, round_, p.name)) for p in targets
                        if (wire.CONTRIB, round_, p.name) in self.inbox}
            # Every site's word, not only the linked ones': a site that left this one out also shut the link.
            dropped_me = sorted(p.name for p in self.peers.values()
                                if self.inbox.pop((wire.DROP, round_, p.name), None) is not None)
            self._forget_round(round_)
        payloads, steps = {self.name: payload}, {self.name: step}
        resync = self._diverged(round_)
        for peer in targets:
            got = received.get(peer.name)
            if peer.name in dropped_me:
                resync = resync or peer.name
            elif got is None:
                self._drop_from_round(peer, round_, started, "outer gradient")
            elif got[:DIGEST_BYTES] != self.digest:  # it started this round from another model
                if peer.name < self.name:
                    resync = resync or peer.name
            else:  # a frame too short for its step leaves an empty payload, refused (logged) by the caller
                head = DIGEST_BYTES + wire.STEP.size
                steps[peer.name] = wire.STEP.unpack_from(got, DIGEST_BYTES)[0] if len(got) >= head else 0
                payloads[peer.name] = got[head:]
        self.members = set(payloads) - {self.name}
        if dropped_me:
            resync = resync or dropped_me[0]
            log.warning("site %s: site(s) %s left this site out of outer round %d; taking their state", self.name,
                        ", ".join(dropped_me), round_)
        return RoundResult(dict(sorted(payloads.items())), resync, members=sorted(payloads), steps=steps)

    def _forget_round(self, round_: int) -> None:
        """Drop the late or stale round frames of rounds up to `round_` (closed); the caller holds `cond`."""
        for key in [k for k in self.inbox if k[1] <= round_ and k[0] in (*wire.GRADIENT_KINDS, wire.DROP)]:
            del self.inbox[key]

    def _diverged(self, round_: int) -> str | None:
        """A site in step but with another model whose name sorts first: this site gives way and takes its state."""
        with self.cond:
            diverged = sorted(p.name for p in self.peers.values() if p.link is not None and p.status is not None
                              and p.status[0] == round_ - 1 and p.status[1] != self.digest and p.name < self.name)
        if diverged:
            log.warning("site %s: site %s ended outer round %d with another model; taking its state", self.name,
                        diverged[0], round_ - 1)
        return diverged[0] if diverged else None

    def _drop_from_round(self, peer: PeerView, round_: int, since: float, missing: str) -> None:
        """Leave `peer` out of round `round_`, whose `missing` frame has not come since `since`: logged, an
        event, and the peer told (DROP) and disconnected; a silent link is shut at once."""
        waited = time.monotonic() - since
        with self.cond:
            silent = peer.sending_since is not None  # this site's frames to it are not taken either
        why = ("its link was lost" if peer.link is None else
               f"no {missing} within {waited:.1f} s (sites.grace_seconds = {self.grace:g})"
               + ("; its link is silent (this site's frames to it were not taken)" if silent else ""))
        log.warning("site %s: dropped site %s from outer round %d: %s", self.name, peer.name, round_, why)
        self.event("site_dropped", site=peer.name, round=round_, waited=round(waited, 3), reason=why)
        if silent:
            self._disconnect(peer)
        else:
            self._send(peer, wire.DROP, round_, close_after=True)  # disconnected once the word is sent

    def set_round(self, round_: int, digest: bytes) -> None:
        """This site holds outer model `digest` of round `round_` (at entry, or loaded from a checkpoint):
        the status it tells the sites it links with from now on."""
        with self.cond:
            self.rounds, self.digest = round_, digest

    def state_taken(self, round_: int, digest: bytes, state: Callable[[], bytes]) -> None:
        """This site took another site's outer model `digest` of round `round_`: the sites in step with it
        are those whose status matches it (none until one says so); then as `finish_round`."""
        with self.cond:
            self.rounds, self.digest, self.members = round_, digest, set()
        self.finish_round(round_, digest, state)

    def finish_round(self, round_: int, digest: bytes, state: Callable[[], bytes]) -> None:
        """Record round `round_` as completed with outer model `digest`; tell the linked sites; give the
        joining ones `state()` (the outer model and momentum now)."""
        with self.cond:
            self.rounds, self.digest = round_, digest
            joiners = [p for p in self.peers.values() if p.link is not None and p.joining]
            linked = [p for p in self.peers.values() if p.link is not None]
        # The status first: a joiner that has the state has this status too (a link's frames arrive in
        # order), so its next round counts this site in step with it.
        for peer in linked:
            self._send(peer, wire.STATUS, round_, digest)
        encoded = state() if joiners else b""
        for peer in joiners:
            self._send(peer, wire.STATE, round_, encoded)  # its sender logs it once sent
            with self.cond:
                peer.joining = False

    def take_state(self, source: str, timeout: float) -> tuple[int, bytes] | None:
        """Ask site `source` for its state after its next round and wait for it: (its round, the state)."""
        peer = self.peers[source]
        deadline = time.monotonic() + timeout
        with self.cond:
            for key in [k for k in self.inbox if k[0] == wire.STATE]:
                del self.inbox[key]
        # A JOIN sent on a link that is closing (the source dropped this site: DROP, then the link shut)
        # never arrives; so while time is left, each new link gets the JOIN again.
        while time.monotonic() < deadline:
            with self.cond:
                while peer.link is None and time.monotonic() < deadline:  # a dropped link is dialled again
                    self.cond.wait(max(deadline - time.monotonic(), 0.0))
                link = peer.link
            if link is None or not self._send(peer, wire.JOIN, self.rounds):
                continue
            with self.cond:
                while True:
                    found = [k for k in self.inbox if k[0] == wire.STATE and k[2] == source]
                    left = deadline - time.monotonic()
                    if found or peer.link is not link or left <= 0:
                        break
                    self.cond.wait(left)
                if found:
                    key = found[0]
                    return key[1], self.inbox.pop(key)
        return None


def _shut(sock: ssl.SSLSocket) -> None:
    """Shut the TCP connection under a TLS link, which wakes a thread blocked sending or reading on it.

    The plain socket's shutdown, not SSLSocket's: that one would also detach the TLS object, and a
    send racing it would then write the rest of its frame in clear."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass  # not connected any more


def event_writer(path: Path) -> Callable[..., None]:
    """Events as JSON lines (the run directory's events.jsonl), one per call."""
    lock = threading.Lock()

    def write(kind: str, **fields) -> None:
        with lock, path.open("a") as out:
            out.write(json.dumps({"t": time.time(), "event": kind, **fields}) + "\n")
    return write
