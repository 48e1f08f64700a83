"""Secure aggregation with a client that forges its weight slot: the server cannot see one update,
but it sets every weight from the Join counts and checks the unmasked total, so the round is
refused; it then reads each survivor's own weight (a public coordinate) from the pairwise mask words
at that slot alone, names the forger and excludes it, and the next round goes on without it.
A real server, real clients, mutual TLS."""

from __future__ import annotations

import json
import logging
import threading

import numpy as np
import torch
from safetensors.torch import load_file

from shoal.config import load
from shoal.observe.metrics import read_metrics
from shoal.federated.client import FederatedClient

from fed_helpers import start_federation, stop_federation, write_config, write_site


class ForgingClient(FederatedClient):
    """Sets its weight slot to -1000 in the first round (the attack of a plain weight-divided mean)."""

    rounds_seen = 0

    def _secagg_vector(self, delta: torch.Tensor, config: dict[str, float]) -> np.ndarray:
        vector = super()._secagg_vector(delta, config)
        self.rounds_seen += 1
        if self.rounds_seen == 1:
            vector[-2] = -1000.0
        return vector


def test_forged_weight_is_caught_after_unmasking(tmp_path, certs_dir, caplog):
    caplog.set_level(logging.INFO, logger="shoal.federated.server")
    cfg = load(write_config(tmp_path / "fed.toml", certs_dir, tmp_path / "runs", "forged", 0, rounds=2,
                            min_clients=3, timeout=30), ["federated.secagg=true", "federated.rounds=3"])
    server, port, driver, run_dir, done = start_federation(cfg, tmp_path)
    initial = {k: v.clone() for k, v in driver.reference.items()}
    rows = {"alpha": 60, "beta": 80, "gamma": 100, "delta": 70}
    clients = [(ForgingClient if name == "gamma" else FederatedClient)(
        cfg, str(write_site(tmp_path / name, n, seed=i)), f"127.0.0.1:{port}", name, tmp_path / "audit" / name)
        for i, (name, n) in enumerate(rows.items())]
    try:
        for client in clients:
            threading.Thread(target=client.run, args=(60.0,), daemon=True).start()
        assert done.wait(120)
        lines = read_metrics(run_dir)
        # gamma forges in the first round it is sampled in (the first or, if it joined late, the second): that
        # round is refused whole; every later round runs without it
        answered = [r["answered"] for r in lines]
        assert answered.count(0) == 1 and answered[-1] == 3 and all(n == 3 for n in answered[answered.index(0) + 1:])
        assert "site 'gamma' sent weight -1000 where the server assigned 75" in caplog.text
        events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
        assert [(e["event"], e["forged_weight"], e["disputed_words"]) for e in events] == [
            ("sites_excluded", ["gamma"], [])]
        assert ": the unmasked weights are -" in caplog.text and "forged its weight" in caplog.text
        final = load_file(str(run_dir / "model.safetensors"))
        assert all(torch.isfinite(t).all() for t in final.values())
        assert any(not torch.equal(final[k], initial[k]) for k in initial)  # the rounds after moved it
        assert max(float(t.abs().max()) for t in final.values()) < 10.0
    finally:
        stop_federation(server, driver, done)
