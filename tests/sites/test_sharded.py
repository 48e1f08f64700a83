"""The sharded outer average of 3 sites (reduce-scatter + all-gather over the plane's TLS links), in one process.

Real site planes on loopback with real certificates; outer rounds driven from threads with the fp32
mean the sites use (shoal/sites/outer.py's `average_in_order`).
"""

from __future__ import annotations

import logging
import threading

import pytest
import torch

from shoal.sites import wire
from shoal.sites.certs import make_site_certs
from shoal.sites.outer import average_in_order, tensor_bytes
from shoal.sites.plane import SitePlane
from tests.conftest import free_port

NUMEL = 30_001  # not a multiple of 3: the shards differ by one value
LIMITS = wire.message_limits(NUMEL)
STEPS = {"a": 5, "b": 7, "c": 11}  # each site's inner steps per round here (they travel with its shards)


@pytest.fixture(scope="module")
def certs_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shard-certs")
    make_site_certs(folder, ["a", "b", "c"])
    return folder


def fp32_mean(rows: dict[str, bytes]) -> bytes:
    return tensor_bytes(average_in_order([torch.frombuffer(bytearray(r), dtype=torch.float32) for r in rows.values()]))


def start_sites(certs_dir, grace: float, events: list) -> dict[str, SitePlane]:
    ports = {name: free_port() for name in "abc"}
    sites = {name: SitePlane(name=name, listen=("127.0.0.1", ports[name]), certs_dir=certs_dir,
                             peers={p: ("127.0.0.1", ports[p]) for p in "abc" if p != name},
                             grace_seconds=grace, limit=LIMITS,
                             events=lambda kind, _n=name, **f: events.append((_n, kind, f)))
             for name in "abc"}
    for plane in sites.values():
        plane.start()
    for plane in sites.values():
        plane.wait_for_links(60)
        assert len(plane.linked()) == 2, f"site {plane.name} linked only with {plane.linked()}"
    return sites


def run_round(sites: dict[str, SitePlane], round_: int, gradients: dict[str, torch.Tensor], means: dict) -> dict:
    results: dict = {}
    threads = [threading.Thread(target=lambda n=n: results.__setitem__(
        n, sites[n].exchange(round_, tensor_bytes(gradients[n]), means[n], 4, step=STEPS[n] * round_)))
        for n in gradients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def gradient_bytes_sent(plane: SitePlane) -> int:
    return sum(plane.traffic["sent"][kind][1] for kind in wire.GRADIENT_KINDS)


def test_three_sites_end_each_round_with_the_plain_average_at_the_bytes_of_a_ring(certs_dir):
    events: list = []
    sites = start_sites(certs_dir, grace=10.0, events=events)
    try:
        generator = torch.Generator().manual_seed(0)
        for round_ in (1, 2):
            gradients = {n: torch.randn(NUMEL, generator=generator) for n in "abc"}
            before = {n: gradient_bytes_sent(p) for n, p in sites.items()}
            results = run_round(sites, round_, gradients, {n: fp32_mean for n in "abc"})
            plain = average_in_order([gradients[n] for n in "abc"])  # what the whole exchange averages to
            for name, result in results.items():
                assert result.average == tensor_bytes(plain), f"site {name}, round {round_}"
                assert result.members == ["a", "b", "c"] and result.resync_from is None
                assert result.steps == {n: STEPS[n] * round_ for n in "abc"}  # each member's step, with its shards
                # A ring all-reduce sends 2(n-1)/n of the gradient per site; the whole exchange sent n-1.
                ratio = (gradient_bytes_sent(sites[name]) - before[name]) / (4 * NUMEL)
                assert 4 / 3 <= ratio < 4 / 3 * 1.005, f"site {name} sent {ratio:.4f} gradients in round {round_}"
                assert sites[name].traffic["sent"][wire.CONTRIB][0] == 0  # nothing whole
            for plane in sites.values():
                plane.finish_round(round_, bytes([round_]) * 32, lambda: b"")
            for plane in sites.values():  # the next round's targets: the statuses of round `round_`
                for peer in plane.peers.values():
                    while peer.status != (round_, bytes([round_]) * 32):
                        with plane.cond:
                            plane.cond.wait(1)
        assert not [e for e in events if e[1] in ("site_dropped", "site_shard_repaired")]
    finally:
        for plane in sites.values():
            plane.close()
    sent = {site: fields["sent"] for site, kind, fields in events if kind == "site_traffic"}
    assert set(sent) == {"a", "b", "c"}  # the frames by kind, as the benchmark reads them
    assert all(by_kind["outer shard"][0] == 4 and by_kind["averaged shard"][0] == 4 for by_kind in sent.values())


def test_a_site_lost_between_the_phases_leaves_the_others_with_the_same_model(certs_dir, caplog):
    caplog.set_level(logging.INFO, logger="shoal.sites")
    events: list = []
    sites = start_sites(certs_dir, grace=2.0, events=events)

    def c_dies_after_averaging(rows: dict[str, bytes]) -> bytes:
        averaged = fp32_mean(rows)
        sites["c"].close()  # c's shards reached a and b; its averaged shard never leaves
        return averaged

    try:
        generator = torch.Generator().manual_seed(1)
        gradients = {n: torch.randn(NUMEL, generator=generator) for n in "abc"}
        results = run_round(sites, 1, gradients, {"a": fp32_mean, "b": fp32_mean, "c": c_dies_after_averaging})
        a, b = results["a"], results["b"]
        assert a.average is not None and a.average == b.average, "a and b ended the round apart"
        # Every shard averaged again by a and b alone: nothing of c, though its shards reached them, and its
        # steps are not in the map (docs/sites.md).
        assert a.average == tensor_bytes(average_in_order([gradients[n] for n in "ab"]))
        assert a.average != tensor_bytes(average_in_order([gradients[n] for n in "abc"]))
        assert a.members == ["a", "b"] == b.members and a.resync_from is None is b.resync_from
        assert a.steps == {"a": STEPS["a"], "b": STEPS["b"]} == b.steps
        assert "did not come in outer round 1; re-averaging them with site(s)" in caplog.text
        repaired = {site for site, kind, fields in events if kind == "site_shard_repaired" and fields["owners"] == ["c"]}
        assert repaired == {"a", "b"}
        dropped = {site for site, kind, fields in events if kind == "site_dropped" and fields["site"] == "c"}
        assert dropped == {"a", "b"}
        assert sites["a"].traffic["sent"][wire.REPAIR][0] == 1  # the extra exchange: only on failure, one shard
    finally:
        for plane in sites.values():
            plane.close()
