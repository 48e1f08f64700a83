"""Robust strategies degrade, never freeze: Krum with too few updates takes the coordinate-wise median
for that round and says so (log, metrics row, events.jsonl); a config where one dropout would always
leave Krum short is refused at start with the number of sites it needs. A real server over mutual TLS,
two honest clients and two sites that join and then fall silent."""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from shoal.config import ConfigError, load
from shoal.federated import federation_pb2 as pb
from shoal.federated import federation_pb2_grpc as pb_grpc
from shoal.federated.client import FederatedClient
from shoal.federated.rounds import check_federated

from fed_helpers import channel, start_federation, stop_federation, write_config, write_site
from tests.conftest import metric_records


def test_a_config_one_dropout_would_freeze_is_refused():
    with pytest.raises(ConfigError, match="needs federated.min_clients >= 6 sites: 5 updates"):
        check_federated(load(None, ["federated.strategy=krum", "federated.byzantine=1", "federated.min_clients=5"]))
    with pytest.raises(ConfigError, match="min_clients >= 8"):
        check_federated(load(None, ["federated.strategy=multikrum", "federated.byzantine=2",
                                    "federated.min_clients=7"]))
    check_federated(load(None, ["federated.strategy=krum", "federated.byzantine=1", "federated.min_clients=6"]))


@pytest.mark.slow
def test_krum_short_of_updates_falls_back_to_the_median(tmp_path, certs_dir, caplog):
    caplog.set_level(logging.INFO, logger="shoal.federated.server")
    # byzantine = 0: Krum needs 3 updates, so 4 sites pass the start check; two of them fall silent
    cfg = load(write_config(tmp_path / "fed.toml", certs_dir, tmp_path / "runs", "degrade", 0, rounds=1,
                            min_clients=4, timeout=3), ["federated.strategy=krum", "federated.byzantine=0"])
    server, port, driver, run_dir, done = start_federation(cfg, tmp_path)
    initial = {k: v.clone() for k, v in driver.reference.items()}
    try:
        for i, name in enumerate(("alpha", "beta")):
            client = FederatedClient(cfg, str(write_site(tmp_path / name, 80, seed=i)), f"127.0.0.1:{port}", name)
            threading.Thread(target=client.run, args=(60.0,), daemon=True).start()
        while not {"alpha", "beta"} <= set(driver.mailbox.live()):
            assert not done.is_set()
            time.sleep(0.05)
        for name in ("gamma", "delta"):  # join, then never ask for work: both drop out of round 1
            with channel(port, certs_dir, name) as ch:
                pb_grpc.FederationStub(ch).Join(pb.JoinRequest(num_samples=40, num_val_samples=10, in_features=6,
                                                               num_classes=2), timeout=10)
        assert done.wait(120)
    finally:
        stop_federation(server, driver, done)
    rows = metric_records(run_dir)
    assert rows[0]["answered"] == 2 and rows[0]["fallback"] == "coordinate median"
    assert "round 1: 2 updates, fewer than the 3 that krum with byzantine = 0 needs; this round takes the " \
           "coordinate-wise median instead" in caplog.text
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert [(e["event"], e["round"], e["rule"]) for e in events] == [("fallback", 1, "coordinate median")]
    final = load_file(str(run_dir / "model.safetensors"))
    assert any(not torch.equal(final[k], initial[k]) for k in initial)  # the model moved: no freeze
