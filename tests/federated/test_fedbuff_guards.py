"""FedBuff against a fast site that scales the model x9 every time: a real server over mutual TLS, two
honest clients (the code `shoal fed client` runs) and the attacker driven by hand. The attacker answers
instantly, so without a share it would fill the buffers; without a bound that ignores the current model
its updates would compound. It gets at most its share of each buffer, each of its updates is dropped and
named, the server finishes with the honest sites, and the saved model stays near where honest training
keeps it."""

from __future__ import annotations

import logging
import threading

import pytest
import torch
from safetensors.torch import load_file, save

from shoal.config import load
from shoal.federated import federation_pb2 as pb
from shoal.federated import federation_pb2_grpc as pb_grpc
from shoal.federated import transport
from shoal.federated.client import FederatedClient

from fed_helpers import channel, start_federation, stop_federation, write_config, write_site
from tests.conftest import metric_records

VERSIONS = 5


@pytest.mark.slow
def test_a_fast_scaling_site_is_capped_and_bounded(tmp_path, certs_dir, caplog):
    caplog.set_level(logging.INFO, logger="shoal.federated.server")
    cfg = load(write_config(tmp_path / "fed.toml", certs_dir, tmp_path / "runs", "fedbuff", 0, rounds=VERSIONS,
                            min_clients=3, timeout=30), ["federated.strategy=fedbuff", "federated.buffer_size=3", "federated.join_timeout=15"])
    server, port, driver, run_dir, done = start_federation(cfg, tmp_path)
    initial_norm = float(driver.global_params.norm())
    sent = 0
    try:
        for i, name in enumerate(("alpha", "beta")):
            client = FederatedClient(cfg, str(write_site(tmp_path / name, 80, seed=i)), f"127.0.0.1:{port}", name)
            threading.Thread(target=client.run, args=(60.0,), daemon=True).start()
        with channel(port, certs_dir, "gamma") as ch:
            stub = pb_grpc.FederationStub(ch)
            stub.Join(pb.JoinRequest(num_samples=60, num_val_samples=20, in_features=6, num_classes=2), timeout=10)
            while not done.is_set():
                task = stub.GetTask(pb.TaskRequest(), timeout=30)
                if task.kind == pb.Task.STOP:
                    break
                if task.kind == pb.Task.EVALUATE:
                    stub.Submit(pb.Result(round=task.round, task_id=task.task_id, num_samples=20,
                                          metrics={"loss": 1.0}))
                if task.kind != pb.Task.TRAIN:
                    continue
                scaled = {k: 9 * v for k, v in transport.decode_model(task.model, driver.reference).items()}
                stub.Submit(pb.Result(round=task.round, task_id=task.task_id, num_samples=60, model=save(scaled)))
                sent += 1
        assert done.wait(120)
    finally:
        stop_federation(server, driver, done)
    rows = metric_records(run_dir)
    assert [r["round"] for r in rows] == list(range(1, VERSIONS + 1))  # it ran to the end with the honest sites
    # three sites, three slots: one each; once gamma's updates are refused it no longer counts, so two each.
    # Whether gamma's instant answer or an honest vote comes first in version 1 is the machine's timing:
    # a buffer holds gamma's one admitted update at a share of 1, or the honest sites' at 2.
    assert all(r["share"] == (1 if "gamma" in r["sites"] else 2) for r in rows), \
        [(r["share"], r["sites"], r.get("dropped")) for r in rows]
    assert all(count <= r["share"] for r in rows for count in r["sites"].values())
    assert sum(r["sites"].get("gamma", 0) for r in rows) <= 1  # the fastest site, yet at most one slot in all
    assert sent >= VERSIONS - 1 and all("gamma" in r.get("dropped", []) for r in rows[1:])
    assert "dropped the update of gamma: staleness-weighted norm" in caplog.text
    final = load_file(str(run_dir / "model.safetensors"))
    norm = float(torch.cat([t.reshape(-1) for t in final.values()]).norm())
    assert norm < 3 * max(1.0, initial_norm), (norm, initial_norm)
