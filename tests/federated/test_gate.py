"""Exhaustion before authentication, against a real server over mutual TLS started with small caps:
hundreds of half-open connections (TCP, no TLS, no certificate) from one address and a few from many
are refused at accept beyond their caps and closed after the handshake deadline, and an honest client
that arrives while the table of unauthenticated connections is full retries with backoff and trains."""

from __future__ import annotations

import logging
import select
import socket
import threading
import time

import pytest

from shoal.config import ConfigError, load
from shoal.federated.client import FederatedClient
from shoal.federated.gate import check_descriptors

from fed_helpers import start_federation, stop_federation, write_config, write_site
from tests.conftest import metric_records, wait_for

PER_PEER, TOTAL, HANDSHAKE = 4, 24, 3.0
FLOOD = 300  # from one address
SPREAD = [f"127.0.0.{i}" for i in range(3, 10)]  # 7 more addresses, PER_PEER each: 28, above TOTAL


def half_open(source: str, port: int) -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(5)
    try:
        sock.connect(("127.0.0.1", port))
    except OSError:
        pass  # refused before the connect returned: counted as closed below
    return sock


def closed_by_server(socks: list[socket.socket], limit: float) -> int:
    """How many of `socks` the server closes (EOF or reset) within `limit` seconds."""
    left, closed, deadline = set(socks), 0, time.monotonic() + limit
    while left and time.monotonic() < deadline:
        readable, _, errored = select.select(list(left), [], list(left), 0.2)
        for sock in set(readable) | set(errored):
            try:
                gone = sock.recv(1) == b""
            except OSError:
                gone = True
            if gone:
                left.discard(sock)
                closed += 1
    return closed


def test_descriptor_headroom_is_checked_at_start():
    cfg = load(None, ["federated.max_connections=1000000"])
    with pytest.raises(ConfigError, match="federated.max_connections = 1000000 needs 3000256 file descriptors"):
        check_descriptors(cfg.federated)


@pytest.mark.slow
def test_half_open_floods_are_capped_and_timed_out_and_honest_sites_get_in(tmp_path, certs_dir, caplog):
    caplog.set_level(logging.INFO, logger="shoal.federated.server")
    cfg = load(write_config(tmp_path / "fed.toml", certs_dir, tmp_path / "runs", "gate", 0, rounds=1,
                            min_clients=1, timeout=30),
               [f"federated.max_pending_per_peer={PER_PEER}", f"federated.max_pending={TOTAL}",
                f"federated.handshake_timeout={HANDSHAKE}"])
    server, port, driver, run_dir, done = start_federation(cfg, tmp_path)
    gate = server.gate
    flood: list[socket.socket] = []
    try:
        started = time.monotonic()
        flood = [half_open("127.0.0.2", port) for _ in range(FLOOD)]
        wait_for(lambda: gate.refused + gate.admitted >= FLOOD, 30, "the gate did not answer the flood")
        # the cap holds at any speed: PER_PEER at once, renewed only as the deadline frees them
        assert gate.admitted <= PER_PEER * (1 + int((time.monotonic() - started) / HANDSHAKE))
        assert gate.refused >= FLOOD - gate.admitted > 0 and gate.pending["127.0.0.2"] <= PER_PEER
        flood += [half_open(source, port) for source in SPREAD for _ in range(PER_PEER)]
        wait_for(lambda: gate.refused + gate.admitted >= len(flood), 30, "the gate did not answer the spread")
        assert sum(gate.pending.values()) <= TOTAL
        client = FederatedClient(cfg, str(write_site(tmp_path / "alpha", 60, seed=0)), f"127.0.0.1:{port}", "alpha")
        threading.Thread(target=client.run, args=(60.0,), daemon=True).start()
        # every half-open connection is closed: the refused ones at once, the admitted ones at the deadline
        assert closed_by_server(flood, limit=10 * HANDSHAKE) == len(flood)
        assert done.wait(60)
    finally:
        for sock in flood:
            sock.close()
        stop_federation(server, driver, done)
    rows = metric_records(run_dir)
    assert rows[0]["answered"] == 1
    assert caplog.text.count("refused a connection from 127.0.0.2 before authentication") == 1  # logged once
    assert "(federated.max_pending_per_peer)" in caplog.text and "(federated.max_pending)" in caplog.text
    assert f"not authenticated within {HANDSHAKE:.1f}s (federated.handshake_timeout)" in caplog.text
    assert "client 'alpha' joined from 127.0.0.1" in caplog.text
