"""Forged evaluation claims against a real server over mutual TLS, with two honest clients (the code
`shoal fed client` runs) and one site driven by hand: an accuracy of 1e15 and a negative loss are
refused; a site that declared a huge held-out count and claims accuracy 0 owns the weighted mean,
but the per-site median and spread recorded beside it show the honest federation."""

from __future__ import annotations

import threading

import pytest

from shoal.config import load
from shoal.federated import federation_pb2 as pb
from shoal.federated import federation_pb2_grpc as pb_grpc
from shoal.federated.client import FederatedClient

from fed_helpers import channel, start_federation, stop_federation, write_config, write_site
from tests.conftest import metric_records

HUGE_VAL = 10 ** 8  # within federated.max_samples: the Join is honest-looking, the weight enormous


def next_task(stub: pb_grpc.FederationStub, kind: int) -> pb.Task:
    for _ in range(200):
        task = stub.GetTask(pb.TaskRequest(), timeout=30)
        if task.kind == kind:
            return task
    raise AssertionError(f"no {pb.Task.Kind.Name(kind)} task")


@pytest.mark.slow
def test_forged_evaluation_claims_are_refused_or_outvoted(tmp_path, certs_dir):
    cfg = load(write_config(tmp_path / "fed.toml", certs_dir, tmp_path / "runs", "claims", 0, rounds=3,
                            min_clients=3, timeout=30))
    server, port, driver, run_dir, done = start_federation(cfg, tmp_path)
    acks = []
    try:
        clients = [FederatedClient(cfg, str(write_site(tmp_path / name, 120, seed=i)), f"127.0.0.1:{port}", name)
                   for i, name in enumerate(("alpha", "beta"))]
        for client in clients:
            threading.Thread(target=client.run, args=(60.0,), daemon=True).start()
        with channel(port, certs_dir, "gamma") as ch:
            stub = pb_grpc.FederationStub(ch)
            stub.Join(pb.JoinRequest(num_samples=50, num_val_samples=HUGE_VAL, in_features=6, num_classes=2),
                      timeout=10)
            for rnd, claim in enumerate(({"accuracy": 1e15}, {"loss": -5.0, "accuracy": 0.5},
                                         {"loss": 0.0, "accuracy": 0.0}), start=1):
                task = next_task(stub, pb.Task.TRAIN)
                stub.Submit(pb.Result(round=rnd, task_id=task.task_id, num_samples=50, model=task.model))
                task = next_task(stub, pb.Task.EVALUATE)
                acks.append(stub.Submit(pb.Result(round=rnd, task_id=task.task_id, num_samples=HUGE_VAL,
                                                  metrics=claim)))
        assert done.wait(120)
    finally:
        stop_federation(server, driver, done)
    assert not acks[0].accepted and "accuracy = 1000000000000000.0 is outside [0, 1]" in acks[0].reason
    assert not acks[1].accepted and "loss = -5.0 is negative" in acks[1].reason
    assert acks[2].accepted
    rows = metric_records(run_dir)
    assert all(0.0 <= r["eval_accuracy"] <= 1.0 for r in rows)
    last = rows[-1]
    assert last["eval_accuracy"] < 1e-4  # the declared count owns the weighted mean...
    assert last["eval_accuracy_min"] == 0.0 and last["eval_accuracy_median"] > 0.3  # ...not the median
    assert last["eval_accuracy_max"] >= last["eval_accuracy_median"]
