"""What one site can send to hurt the federation, refused: a real server over mutual TLS, two honest
clients (the code `shoal fed client` runs) and one attacker driving the protocol by hand.

The attacker tries Joins that would crash the server or fix the model's shape, then, round by
round: a finite but huge update (dropped by the norm bound), a sample count far above its Join
(refused), an out-of-round message bigger than the model (refused by gRPC from its length),
and a huge update under a bound set too loose (the new global model is refused instead).
"""

from __future__ import annotations

import logging
import threading

import grpc
import pytest
import torch
from safetensors.torch import load, load_file, save

from shoal.config import load as load_config
from shoal.federated import federation_pb2 as pb
from shoal.federated import federation_pb2_grpc as pb_grpc
from shoal.federated import transport
from shoal.federated.aggregate import Aggregator
from shoal.federated.client import FederatedClient
from shoal.federated.strategies import ClientUpdate, build_strategy

from fed_helpers import channel, start_federation, stop_federation, write_config, write_site
from tests.conftest import metric_records

ROWS = {"alpha": 80, "beta": 120}  # honest sites; 25% of rows are held out
GAMMA_SAMPLES, GAMMA_VAL = 50, 10


class Records(logging.Handler):
    """The server log's messages, kept for a whole module (caplog lives for one test)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def next_task(stub: pb_grpc.FederationStub, kind: int) -> pb.Task:
    for _ in range(200):
        task = stub.GetTask(pb.TaskRequest(), timeout=30)
        if task.kind == kind:
            return task
    raise AssertionError(f"no {pb.Task.Kind.Name(kind)} task")


def huge(task: pb.Task, reference: dict[str, torch.Tensor]) -> bytes:
    """Every weight 1e30: finite, the right shapes and dtype, so only its size gives it away."""
    return save({k: torch.full_like(v, 1e30) for k, v in transport.decode_model(task.model, reference).items()})


@pytest.fixture(scope="module")
def attacked(tmp_path_factory, certs_dir):
    tmp = tmp_path_factory.mktemp("refusals")
    handler, server_log = Records(), logging.getLogger("shoal.federated.server")
    server_log.addHandler(handler)
    server_log.setLevel(logging.INFO)
    records = handler.messages
    cfg = load_config(write_config(tmp / "fed.toml", certs_dir, tmp / "runs", "attacked", 0, rounds=3,
                                   min_clients=3, timeout=30))
    server, port, driver, run_dir, done = start_federation(cfg, tmp)
    seen: dict[str, object] = {"limit": driver.message_limit}
    try:
        with channel(port, certs_dir, "gamma") as ch:
            stub = pb_grpc.FederationStub(ch)
            refusals = {}
            for what, join in {
                "classes": pb.JoinRequest(num_samples=10, num_val_samples=1, in_features=6, num_classes=2 ** 40),
                "features": pb.JoinRequest(num_samples=10, num_val_samples=1, in_features=9999, num_classes=2),
                "samples": pb.JoinRequest(num_samples=10 ** 12, num_val_samples=1, in_features=6, num_classes=2),
            }.items():
                with pytest.raises(grpc.RpcError) as err:
                    stub.Join(join, timeout=10)
                refusals[what] = (err.value.code(), err.value.details())
            seen["join_refusals"] = refusals
            # the honest sites join after the attacker's bad Joins: those must not have shaped anything
            clients = [FederatedClient(cfg, str(write_site(tmp / name, rows, seed=i)), f"127.0.0.1:{port}", name,
                                       tmp / "audit" / name) for i, (name, rows) in enumerate(ROWS.items())]
            for client in clients:
                threading.Thread(target=client.run, args=(60.0,), daemon=True).start()
            stub.Join(pb.JoinRequest(num_samples=GAMMA_SAMPLES, num_val_samples=GAMMA_VAL, in_features=6,
                                     num_classes=2), timeout=10)

            # round 1: a finite but huge update, and an evaluation claiming a million held-out rows
            task = next_task(stub, pb.Task.TRAIN)
            seen["ack_huge"] = stub.Submit(pb.Result(round=1, task_id=task.task_id, num_samples=GAMMA_SAMPLES,
                                                     model=huge(task, driver.reference)))
            ev = next_task(stub, pb.Task.EVALUATE)
            seen["ack_eval"] = stub.Submit(pb.Result(round=1, task_id=ev.task_id, num_samples=10 ** 6,
                                                     metrics={"loss": 0.0}))

            # round 2: an honest model that claims 10^12 samples; an evaluation with a thousand metrics
            task = next_task(stub, pb.Task.TRAIN)
            seen["after_round_1"] = load(task.model)
            seen["ack_claim"] = stub.Submit(pb.Result(round=2, task_id=task.task_id, num_samples=10 ** 12,
                                                      model=task.model))
            ev = next_task(stub, pb.Task.EVALUATE)
            seen["ack_metrics"] = stub.Submit(pb.Result(round=2, task_id=ev.task_id, num_samples=GAMMA_VAL,
                                                        metrics={f"m{i}": 0.0 for i in range(1000)}))

            # round 3: a message bigger than the model, out of round; then a huge update under a bound set
            # far too loose, which the check of the new global model must catch
            task = next_task(stub, pb.Task.TRAIN)
            seen["after_round_2"] = load(task.model)
            with pytest.raises(grpc.RpcError) as err:
                stub.Submit(pb.Result(round=3, task_id=b"x" * 16, model=bytes(driver.message_limit + 2 ** 20)),
                            timeout=30)
            seen["oversized"] = err.value.code()
            driver.fed.max_update_norm = 1e300
            seen["ack_loose"] = stub.Submit(pb.Result(round=3, task_id=task.task_id, num_samples=GAMMA_SAMPLES,
                                                      model=huge(task, driver.reference)))
            ev = next_task(stub, pb.Task.EVALUATE)
            stub.Submit(pb.Result(round=3, task_id=ev.task_id, num_samples=GAMMA_VAL, metrics={"loss": 1.0}))
            assert done.wait(120)
        yield driver, run_dir, tmp, seen, records
    finally:
        server_log.removeHandler(handler)
        stop_federation(server, driver, done)


def test_joins_cannot_crash_the_server_or_shape_the_model(attacked):
    driver, run_dir, _, seen, records = attacked
    refusals = seen["join_refusals"]
    assert all(code == grpc.StatusCode.FAILED_PRECONDITION for code, _ in refusals.values())
    assert "num_classes = 1099511627776; this federation's model has 2 classes" in refusals["classes"][1]
    assert "in_features = 9999; this federation's model takes 6" in refusals["features"][1]
    assert "federated.max_samples" in refusals["samples"][1]
    log = "\n".join(records)
    assert "refused client 'gamma'" in log and "'alpha' joined" in log and "'beta' joined" in log
    rows = metric_records(run_dir)
    assert [r["round"] for r in rows] == [1, 2, 3]  # the federation ran with the server's shape


def test_a_huge_update_is_dropped_and_the_round_is_the_honest_mean(attacked):
    driver, run_dir, tmp, seen, records = attacked
    assert seen["ack_huge"].accepted  # well-formed: only the aggregator's norm bound can tell
    rows = metric_records(run_dir)
    assert rows[0]["dropped"] == ["gamma"] and rows[0]["answered"] == 3
    assert any("dropped the updates of ['gamma']" in r for r in records)
    sent = {s: load((tmp / "audit" / s / "round-0001.safetensors").read_bytes()) for s in ROWS}
    weights = {s: ROWS[s] - ROWS[s] // 4 for s in ROWS}
    for name, tensor in seen["after_round_1"].items():
        expected = sum(weights[s] * sent[s][name].double() for s in sent) / sum(weights.values())
        torch.testing.assert_close(tensor.double(), expected, rtol=0, atol=1e-6)


def test_claims_above_the_join_are_refused(attacked):
    _, _, _, seen, records = attacked
    assert not seen["ack_claim"].accepted
    assert f"num_samples = {10 ** 12} is outside 1..{GAMMA_SAMPLES}" in seen["ack_claim"].reason
    assert not seen["ack_eval"].accepted and f"outside 0..{GAMMA_VAL}" in seen["ack_eval"].reason
    assert not seen["ack_metrics"].accepted and "1000 metrics" in seen["ack_metrics"].reason
    assert any("rejected TRAIN from client gamma in round 2" in r for r in records)


def test_oversized_message_is_refused_by_its_length_and_the_limit_follows_the_model(attacked):
    driver, _, _, seen, _ = attacked
    assert seen["oversized"] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert driver.message_limit == transport.message_limit(driver.length, 512) < 2 * 2 ** 20


def test_a_poisoned_global_model_is_refused_and_the_previous_one_kept(attacked):
    _, run_dir, _, seen, records = attacked
    assert seen["ack_loose"].accepted
    assert any("round 3: refused the new global model: its largest parameter" in r for r in records)
    final = load_file(str(run_dir / "model.safetensors"))
    for name, tensor in seen["after_round_2"].items():
        assert torch.equal(final[name], tensor), name


def test_refused_global_model_restores_the_server_optimizer_state():
    """FedAdam's moments must not keep what a refused round brought, or they push the model toward it."""
    cfg = load_config(None, ["federated.strategy=fedadam", "federated.server_lr=0.1"])
    aggregator = Aggregator(cfg.federated, build_strategy(cfg.federated), None)
    params = torch.ones(4, dtype=torch.float64)
    honest = [ClientUpdate("a", torch.full((4,), 0.1, dtype=torch.float64), 10)]
    params, _ = aggregator.from_updates(1, params, honest, 1, 1.0)
    moments = aggregator.strategy.m.clone(), aggregator.strategy.v.clone()
    cfg.federated.server_lr = 1000.0  # a step of about 1000 per coordinate: far past ten times the largest weight
    after, _ = aggregator.from_updates(2, params, honest, 1, 1.0)
    assert torch.equal(after, params)
    assert torch.equal(aggregator.strategy.m, moments[0]) and torch.equal(aggregator.strategy.v, moments[1])
    # an update a billion times the others never reaches the strategy
    cfg.federated.server_lr = 0.1
    poisoned = ClientUpdate("b", torch.full((4,), 1e8, dtype=torch.float64), 10)
    kept, dropped = aggregator.from_updates(3, params, [honest[0], poisoned, honest[0]], 3, 1.0)
    assert dropped == ["b"] and float((kept - params).abs().max()) < 1.0


def test_a_sum_longer_than_the_clip_norms_allow_is_refused():
    """Under secure aggregation with DP the clients clip; a client that does not shows in the sum's norm."""
    from shoal.federated.privacy import CentralDP

    cfg = load_config(None, ["federated.dp=fixed", "federated.dp_clip=1.0", "federated.dp_noise=0.0"])
    aggregator = Aggregator(cfg.federated, build_strategy(cfg.federated), CentralDP(cfg.federated))
    params, who = torch.zeros(4, dtype=torch.float64), ["a", "b", "c"]
    moved = aggregator.from_sum(1, params, torch.full((4,), 0.5, dtype=torch.float64), 3.0, 3, 3.0, 1.0, who)
    torch.testing.assert_close(moved, torch.full((4,), 0.5 / 3, dtype=torch.float64))
    kept = aggregator.from_sum(2, moved, torch.full((4,), 5.0, dtype=torch.float64), 3.0, 3, 3.0, 1.0, who)
    assert torch.equal(kept, moved)  # norm 10 from three updates of norm at most 1
