"""Actors on other hosts: weights and games relayed through the job's c10d store.

A self-play job's files live in node rank 0's run directory (shoal/selfplay/transport.py). A
host that adds actors (`shoal launch --node-rank K`, K > 0) runs them against a run directory
of its own, and a relay on each side copies between the two through the c10d TCPStore that
node rank 0's launcher hosts on the `--rdzv` port (torch.distributed's key-value store, the
same one torchrun's rendezvous uses; no other RPC):

    node rank 0 (JobRelay)                         store                    host K (HostRelay)
    newest selfplay/weights/v*.safetensors  ->  weights, version   ->  its selfplay/weights/
    selfplay/games/h<host>-<batch>          <-  games queue        <-  its actors' new batches
    finished / failed                       ->  end                ->  finished: its actors leave

The actors do not know which side they are on. Every batch travels as the bytes of its
safetensors file (never a pickle), pushed whole onto the store's queue and written on node rank
0 beside its name and renamed, so a batch is whole or absent there as everywhere; it is renamed
`h<host>-<id>` with a host number the job hands out (`store.add`), so ids of two hosts, or of a
host that comes back, never meet. The learner ingests them like its own host's batches.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from shoal.selfplay import transport

log = logging.getLogger("shoal")

PREFIX = "selfplay/"
META_KEY = PREFIX + "meta"  # the settings actors must share with the learner (JSON)
VERSION_KEY = PREFIX + "version"  # the newest weight version in WEIGHTS_KEY, as text
WEIGHTS_KEY = PREFIX + "weights"  # b"<version>\n" + the safetensors file's bytes
GAMES_QUEUE = PREFIX + "games"  # b"<batch id>\n" + the safetensors file's bytes, one item per batch
HOSTS_KEY = PREFIX + "hosts"  # the last host number handed out
LEFT_KEY = PREFIX + "left"  # hosts that saw the end and left
END_KEY = PREFIX + "end"  # "finished", "stopped" (a stop signal; --resume continues) or "failed: <reason>"
SHARED_SETTINGS = ("game", "channels", "blocks")  # the job's weights load only into the same network


def job_meta(selfplay) -> dict:
    """What a joining host's [selfplay] must agree on with the job (its `selfplay` config section)."""
    return {name: getattr(selfplay, name) for name in SHARED_SETTINGS}


class JobRelay:
    """Node rank 0's side: publishes weights and the job's end, takes in other hosts' batches."""

    def __init__(self, store, run_dir: Path, meta: dict):
        self.store, self.run_dir = store, Path(run_dir)
        self.published = -1
        self.ended = False
        store.set(META_KEY, json.dumps(meta))
        # A resumed job's store is new: continue the host numbers its games folder already holds.
        folder = transport.selfplay_dir(self.run_dir) / "games"
        hosts = [int(m.group(1)) for path in (folder.iterdir() if folder.is_dir() else [])
                 if (m := transport.BATCH_ID.match(path.name.removesuffix(".safetensors"))) and m.group(1)]
        self.first_host = max(hosts, default=0) + 1
        self.hosts_seen = store.add(HOSTS_KEY, self.first_host - 1)

    def step(self) -> list[str]:
        """One pass: newer weights out, the end out, queued batches in; the batch ids written."""
        latest = transport.latest_version(self.run_dir)
        if latest > self.published:
            try:
                data = transport.weights_path(self.run_dir, latest).read_bytes()
            except FileNotFoundError:  # replaced by a newer version meanwhile: the next pass sends that
                data = None
            if data is not None:
                self.store.set(WEIGHTS_KEY, f"{latest}\n".encode() + data)
                self.store.set(VERSION_KEY, str(latest))
                self.published = latest
        if not self.ended:
            reason = "finished" if transport.finished(self.run_dir) else transport.failure(self.run_dir)
            if reason:
                self.store.set(END_KEY, reason if reason == "finished" else f"failed: {reason}")
                self.ended = True
        written = []
        while self.store.queue_len(GAMES_QUEUE):
            batch, _, data = bytes(self.store.queue_pop(GAMES_QUEUE, False)).partition(b"\n")
            name = batch.decode(errors="replace")
            match = transport.BATCH_ID.match(name)
            if not match or not match.group(1) or int(match.group(1)) < self.first_host:
                log.warning("relay: dropped a batch named %r from another host: not a host's batch id", name[:80])
                continue
            try:
                transport.write_games_file(self.run_dir, name, data)
            except ValueError as err:
                log.warning("relay: dropped %s", err)
                continue
            written.append(name)
        return written

    def joined(self) -> list[int]:
        """Host numbers handed out since the last call (hosts that joined)."""
        now = self.store.add(HOSTS_KEY, 0)
        new = list(range(self.hosts_seen + 1, now + 1))
        self.hosts_seen = now
        return new

    def end(self, reason: str) -> None:
        """Publish the job's end now (node rank 0's launcher is stopping), unless it already was."""
        if not self.ended:
            self.store.set(END_KEY, reason)
            self.ended = True

    def wait_for_hosts(self, seconds: float) -> None:
        """After the end is published, give the joined hosts up to `seconds` to see it (they leave
        with exit code 0 then, rather than finding the store gone)."""
        deadline = time.monotonic() + seconds
        joined = self.store.add(HOSTS_KEY, 0) - (self.first_host - 1)
        while self.ended and self.store.add(LEFT_KEY, 0) < joined and time.monotonic() < deadline:
            time.sleep(0.05)


class JobMismatch(ValueError):
    """This host's [selfplay] settings differ from the job's: its actors' games would not fit."""


class HostRelay:
    """A joining host's side: takes in the job's weights and end, sends its actors' batches."""

    def __init__(self, store, run_dir: Path, meta: dict):
        self.store, self.run_dir = store, Path(run_dir)
        job = json.loads(bytes(store.get(META_KEY)).decode())
        for name, value in meta.items():
            if job.get(name, value) != value:
                raise JobMismatch(f"selfplay.{name} = {value!r} here, but the job runs with selfplay.{name} = "
                                  f"{job[name]!r}: give this host the job's config")
        self.host = store.add(HOSTS_KEY, 1)
        self.version = transport.latest_version(self.run_dir)
        self.sent: set[str] = set()

    def step(self) -> str | None:
        """One pass: newer weights in, this host's new batches out; the job's end ("finished",
        "stopped" or "failed: ...") once node rank 0 has published it, else None."""
        if self.store.check([VERSION_KEY]) and int(bytes(self.store.get(VERSION_KEY))) > self.version:
            head, _, data = bytes(self.store.get(WEIGHTS_KEY)).partition(b"\n")
            version = int(head)
            if version > self.version:
                transport.publish_weights_file(self.run_dir, version, data)
                self.version = version
        for batch in transport.local_batches(self.run_dir):
            if batch not in self.sent:
                data = transport.games_path(self.run_dir, batch).read_bytes()
                self.store.queue_push(GAMES_QUEUE, f"h{self.host}-{batch}\n".encode() + data)
                self.sent.add(batch)
        if self.store.check([END_KEY]):
            return bytes(self.store.get(END_KEY)).decode()
        return None

    def leave(self) -> None:
        """Tell node rank 0 this host saw the end."""
        self.store.add(LEFT_KEY, 1)
