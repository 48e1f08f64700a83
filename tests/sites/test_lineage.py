"""Which steps of each site an outer model holds (shoal/sites/lineage.py), in one process: two site leaders'
`SitesDiLoCo` over real planes (TLS on loopback) on a one-rank Gloo group, their rounds driven step by step."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import save as st_save

from shoal.runtime import before_init  # noqa: F401  (before any init_process_group)
from shoal.sites import wire
from shoal.sites.certs import make_site_certs
from shoal.sites.lineage import METADATA_KEY, SiteSteps
from shoal.sites.outer import SitesDiLoCo
from shoal.sites.plane import SitePlane
from tests.conftest import free_port, wait_for

H = 2  # inner steps per outer round
SHARE = 4  # samples of a site's share per step


def test_averaging_updates_the_map_and_it_travels_in_the_state_metadata():
    steps = SiteSteps()
    steps.averaged({"a": 5, "b": 5})
    steps.averaged({"a": 10})  # a round a averaged alone: b's entry stays that of its last round in the model
    assert steps.steps == {"a": 10, "b": 5} and steps.step_of("b") == 5 and steps.step_of("c") == 0
    blob = st_save({"outer.0": torch.zeros(2)}, metadata=steps.metadata())
    assert SiteSteps.from_safetensors(blob) == steps
    with pytest.raises(ValueError, match="does not say which steps"):
        SiteSteps.from_safetensors(st_save({"outer.0": torch.zeros(2)}))
    with pytest.raises(ValueError, match="not site name -> step"):
        SiteSteps.from_safetensors(st_save({"outer.0": torch.zeros(2)}, metadata={METADATA_KEY: json.dumps(
            {"a": -1})}))
    with pytest.raises(ValueError, match="no safetensors header"):
        SiteSteps.from_safetensors(b"\xff" * 16)


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


class Site:
    """One site leader: a tiny model, its inner optimizer, and `SitesDiLoCo` over its plane."""

    def __init__(self, name: str, ports: dict[str, int], certs: Path, events: list, grace: float):
        torch.manual_seed(0)  # every site starts from the same model, as a job's sites do
        self.model = torch.nn.Linear(4, 2)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1)
        self.plane = SitePlane(name=name, listen=("127.0.0.1", ports[name]),
                               peers={p: ("127.0.0.1", port) for p, port in ports.items() if p != name},
                               certs_dir=certs, grace_seconds=grace, limit=wire.message_limits(10),
                               events=lambda kind, **fields: events.append((name, kind, fields)))
        self.sync = SitesDiLoCo(self.model, self.optimizer, plane=self.plane, join_timeout=30,
                                samples_per_step=SHARE, group=dist.group.WORLD, inner_steps=H, compression="none",
                                outer_lr=0.7, outer_momentum=0.9)

    def train(self, steps: int) -> threading.Thread:
        def run() -> None:
            for _ in range(steps):
                self.model(torch.randn(3, 4)).square().sum().backward()
                self.optimizer.step()  # a round every H steps, in DiLoCo's post-step hook
                self.optimizer.zero_grad()
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread


def round_of_both(a: Site, b: Site, round_: int) -> None:
    """Outer round `round_` of both, paced by events: b trains first, and a only once b's outer gradient has
    reached it, so a's short grace window never races b's steps (a loaded machine may take seconds for them)."""
    late = b.train(H)
    wait_for(lambda: (wire.CONTRIB, round_, "b") in a.plane.inbox)
    a.train(H).join(60)
    late.join(60)


def test_a_dropped_site_takes_the_map_with_the_state_and_continues_after_its_own_entry(tmp_path, one_rank_group):
    """Round 1 of both; b is left out of round 2 and takes a's state of round 3, whose map holds b's steps
    up to step 2 only: b continues at step 2 (its steps 3-4 are read again, an event says so), and its
    next round with a puts its rewound step into both maps."""
    certs = tmp_path / "certs"
    make_site_certs(certs, ["a", "b"])
    ports = {"a": free_port(), "b": free_port()}
    events: list = []
    # a drops b in round 2 after a short grace window; b drops no one, and waits for a as long as a needs.
    a, b = (Site(name, ports, certs, events, grace) for name, grace in (("a", 1.0), ("b", 60.0)))
    with a.sync, b.sync:
        round_of_both(a, b, 1)
        assert a.sync.site_steps.steps == {"a": 2, "b": 2} == b.sync.site_steps.steps
        a.train(H).join(60)  # round 2: b sends nothing, a drops it after the grace window and goes on alone
        assert a.sync.site_steps.steps == {"a": 4, "b": 2}
        wait_for(lambda: (wire.DROP, 2, "a") in b.plane.inbox)
        late = b.train(H)  # b's round 2: left out, it asks a for its state after a's next round
        wait_for(lambda: a.plane.peers["b"].joining)
        a.train(H).join(60)  # round 3, sent to b
        late.join(60)
        assert b.sync.site_steps.steps == {"a": 6, "b": 2} and b.sync.outer_syncs == 3
        assert b.sync.inner_step == 2 and b.sync.step_to_continue_at() == 2
        assert b.sync.step_to_continue_at() is None  # once
        assert [f for n, kind, f in events if kind == "site_data_reread"] == [
            {"site": "b", "first": 3, "last": 4, "samples": 2 * SHARE, "source": "a", "own_round": 2, "round": 3}]
        assert b.sync.outer_digest() == a.sync.outer_digest()
        round_of_both(a, b, 4)  # a at step 8, b at its step 4 again
        assert a.sync.site_steps.steps == {"a": 8, "b": 4} == b.sync.site_steps.steps
        assert a.sync.state_dict()["site_steps"] == {"a": 8, "b": 4}  # in the leader's checkpoint too
