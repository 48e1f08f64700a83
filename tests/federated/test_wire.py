"""The TLS gRPC server in this process, a hand-driven client: authentication and bad input."""

from __future__ import annotations

import logging
import threading

import grpc
import numpy as np
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


@pytest.fixture
def federation(tmp_path, certs_dir, caplog):
    caplog.set_level(logging.INFO, logger="shoal.federated.server")
    cfg = load(write_config(tmp_path / "fed.toml", certs_dir, tmp_path / "runs", "wire", 0, rounds=3,
                            min_clients=1, timeout=20))
    server, port, driver, run_dir, done = start_federation(cfg, tmp_path)
    yield port, driver, run_dir, done
    stop_federation(server, driver, done)


def test_unauthenticated_clients_are_refused(federation, certs_dir, caplog):
    port, *_ = federation
    join = pb.JoinRequest(num_samples=10, in_features=6, num_classes=2)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as plain:  # plaintext against a TLS port
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.FederationStub(plain).Join(join, timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # a certificate named like a real site but signed by another CA
    with channel(port, certs_dir / "other-ca", "alpha", ca=certs_dir / "ca.pem") as forged:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.FederationStub(forged).Join(join, timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with channel(port, certs_dir, "revoked") as revoked:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.FederationStub(revoked).Join(join, timeout=5)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "refused client 'revoked'" in caplog.text and "is revoked" in caplog.text
    assert "joined" not in caplog.text  # none of them got in


def test_bad_updates_never_reach_the_global_model(federation, certs_dir, caplog):
    port, driver, run_dir, done = federation
    with channel(port, certs_dir, "alpha") as ch:
        stub = pb_grpc.FederationStub(ch)
        join = pb.JoinRequest(num_samples=10, num_val_samples=10, in_features=6, num_classes=2)
        assert stub.Join(join, timeout=10).client_id == "alpha"

        def next_task(kind):
            for _ in range(100):
                task = stub.GetTask(pb.TaskRequest(), timeout=10)
                if task.kind == kind:
                    return task
            raise AssertionError(f"no {kind} task")

        first = next_task(pb.Task.TRAIN)
        initial = transport.decode_model(first.model, driver.reference)
        shapes = {k: v.shape for k, v in initial.items()}
        bad_models = [
            ({k: torch.full(s, float("nan")) for k, s in shapes.items()}, "NaN"),
            ({k: torch.zeros(*s, 2) for k, s in shapes.items()}, "shape"),
            ({**{k: torch.zeros(s) for k, s in shapes.items()}, "extra": torch.zeros(100_000)}, "oversized"),
        ]
        replayed = None
        for rnd, (tensors, reason) in enumerate(bad_models, start=1):
            task = first if rnd == 1 else next_task(pb.Task.TRAIN)
            assert task.round == rnd
            ack = stub.Submit(pb.Result(round=rnd, task_id=task.task_id, num_samples=10, model=save(tensors)))
            assert not ack.accepted and reason in ack.reason
            evaluate = next_task(pb.Task.EVALUATE)
            if replayed is None:
                ack = stub.Submit(pb.Result(round=rnd, task_id=task.task_id, num_samples=10))
                assert not ack.accepted and "replayed" in ack.reason
                replayed = task
            ack = stub.Submit(pb.Result(round=rnd, task_id=b"x" * 16, num_samples=10))
            assert not ack.accepted and "out-of-round" in ack.reason
            ack = stub.Submit(pb.Result(round=rnd + 7, task_id=evaluate.task_id, num_samples=10))
            assert not ack.accepted and "does not match" in ack.reason
            ack = stub.Submit(pb.Result(round=rnd, task_id=evaluate.task_id, num_samples=10,
                                        metrics={"accuracy": 0.5}))
            assert ack.accepted, ack.reason
        assert done.wait(30)
    final = load_file(str(run_dir / "model.safetensors"))
    for name, tensor in initial.items():
        assert torch.equal(final[name], tensor), name
    assert caplog.text.count("the global model is unchanged") == 3
    assert "rejected TRAIN from client alpha in round 1: tensor" in caplog.text


def test_decode_model_checks_dtype_and_names():
    ref = {"w": torch.zeros(2, 2)}
    with pytest.raises(transport.BadUpdate, match="dtype"):
        transport.decode_model(save({"w": torch.zeros(2, 2, dtype=torch.float64)}), ref)
    with pytest.raises(transport.BadUpdate, match="missing"):
        transport.decode_model(save({"v": torch.zeros(2, 2)}), ref)
    with pytest.raises(transport.BadUpdate, match="malformed"):
        transport.decode_model(b"\x00" * 40, ref)
    with pytest.raises(transport.BadUpdate, match="bytes"):
        transport.decode_u64(np.zeros(3, dtype=np.uint64).tobytes(), 4)
    vector = torch.arange(4, dtype=torch.float64)
    assert torch.equal(transport.flatten(transport.unflatten(vector, ref)), vector)


def test_secure_aggregation_with_dp_through_real_clients(tmp_path, certs_dir, caplog):
    """The client code as `shoal fed client` runs it, in threads: four Bonawitz phases over TLS."""
    caplog.set_level(logging.INFO, logger="shoal.federated.server")
    cfg = load(write_config(tmp_path / "fed.toml", certs_dir, tmp_path / "runs", "secure", 0, rounds=2,
                            min_clients=3, timeout=30),
               ["federated.secagg=true", "federated.dp=fixed", "federated.dp_noise=0.8", "federated.dp_clip=0.5"])
    server, port, driver, run_dir, done = start_federation(cfg, tmp_path)
    names = ["alpha", "beta", "gamma"]
    sites = {name: write_site(tmp_path / name, 120 + 40 * i, seed=i) for i, name in enumerate(names)}
    clients = [FederatedClient(cfg, str(path), f"127.0.0.1:{port}", name, tmp_path / "audit" / name)
               for name, path in sites.items()]
    threads = [threading.Thread(target=c.run, args=(60.0,), daemon=True) for c in clients]
    try:
        for t in threads:
            t.start()
        assert done.wait(120)
        rows = metric_records(run_dir)
        assert [r["answered"] for r in rows] == [3, 3]
        assert 0 < rows[0]["epsilon"] < rows[1]["epsilon"] < float("inf")
        # what left a site is a masked vector of uniform 64-bit words, never a model
        masked = np.frombuffer((tmp_path / "audit" / "alpha" / "round-0001.masked").read_bytes(), dtype="<u8")
        assert abs((masked.astype(np.float64) / 2.0 ** 64).mean() - 0.5) < 0.1
        assert not list((tmp_path / "audit" / "alpha").glob("*.safetensors"))
        assert "failed" not in caplog.text and "rejected" not in caplog.text
    finally:
        stop_federation(server, driver, done)


def test_fedbuff_applies_buffers_of_stale_updates(tmp_path, certs_dir):
    """Asynchronous FedBuff with real client code: versions advance per buffer, staleness is recorded."""
    cfg = load(write_config(tmp_path / "fed.toml", certs_dir, tmp_path / "runs", "buff", 0, rounds=4,
                            min_clients=3, timeout=30),
               ["federated.strategy=fedbuff", "federated.buffer_size=2", "federated.max_staleness=3"])
    server, port, driver, run_dir, done = start_federation(cfg, tmp_path)
    names = ["alpha", "beta", "gamma"]
    sites = {name: write_site(tmp_path / name, 60 + 200 * i, seed=i) for i, name in enumerate(names)}
    clients = [FederatedClient(cfg, str(path), f"127.0.0.1:{port}", name) for name, path in sites.items()]
    try:
        for client in clients:
            threading.Thread(target=client.run, args=(60.0,), daemon=True).start()
        assert done.wait(120)
        rows = metric_records(run_dir)
        assert [r["round"] for r in rows] == [1, 2, 3, 4]
        assert all(r["answered"] == 2 and len(r["staleness"]) == 2 for r in rows)
        assert all(0 <= s <= 3 for r in rows for s in r["staleness"])
        assert any(s > 0 for r in rows for s in r["staleness"])  # someone trained on an old version
        assert (run_dir / "model.safetensors").exists()
    finally:
        stop_federation(server, driver, done)


def test_large_model_and_client_errors_with_traceback(tmp_path, certs_dir, caplog):
    """A 5 MB model passes gRPC's 4 MiB default; a site that fails while working on a task (here its
    audit folder is a file) reports its exception, and the server log shows the client's traceback
    while the round goes on."""
    caplog.set_level(logging.INFO, logger="shoal.federated.server")
    # Both sites in every round (min_clients=2): alpha answers, beta fails, whichever joins first.
    cfg = load(write_config(tmp_path / "fed.toml", certs_dir, tmp_path / "runs", "large", 0, rounds=3,
                            min_clients=2, timeout=30), ["model.dim=1100", "model.n_layers=2"])
    server, port, driver, run_dir, done = start_federation(cfg, tmp_path)
    alpha = FederatedClient(cfg, str(write_site(tmp_path / "alpha", 16, seed=0)), f"127.0.0.1:{port}", "alpha")
    (tmp_path / "not-a-folder").write_text("")
    beta = FederatedClient(cfg, str(write_site(tmp_path / "beta", 16, seed=1)), f"127.0.0.1:{port}", "beta",
                           tmp_path / "not-a-folder")
    try:
        assert driver.length > 1_000_000  # the model comes from the config, before anyone joins
        threading.Thread(target=alpha.run, args=(60.0,), daemon=True).start()
        threading.Thread(target=beta.run, args=(60.0,), daemon=True).start()
        assert done.wait(120)
        rows = metric_records(run_dir)
        assert all(r["answered"] == 1 for r in rows)
        assert "client beta failed in round" in caplog.text
        assert "Traceback" in caplog.text and "FileExistsError" in caplog.text
    finally:
        stop_federation(server, driver, done)


def test_a_site_still_working_when_the_federation_stops_exits_cleanly(tmp_path, certs_dir):
    # the client retries its answer until the round's deadline (round_timeout), then knows the server is gone
    cfg = load(write_config(tmp_path / "fed.toml", certs_dir, tmp_path / "runs", "late", 0, rounds=3,
                            min_clients=1, timeout=4))
    server, port, driver, run_dir, done = start_federation(cfg, tmp_path)
    working, stopped = threading.Event(), threading.Event()

    class Slow(FederatedClient):
        def work(self, task, result):
            working.set()
            stopped.wait(60)  # answers only after the server has gone
            super().work(task, result)

    client = Slow(cfg, str(write_site(tmp_path / "alpha", 40, seed=0)), f"127.0.0.1:{port}", "alpha")
    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(client.run(60.0)), daemon=True)
    thread.start()
    try:
        assert working.wait(60)
    finally:
        stop_federation(server, driver, done)
        stopped.set()
    thread.join(60)
    assert outcome == [0]  # "server gone", not an RpcError out of Submit
