"""Real processes on loopback over mutual TLS: one server and four clients, started as a user would.

FedAvg over four sites; 'delta' is killed with SIGKILL in the middle of the last round, which
must close with the other three and give exactly their sample-weighted mean.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, load_file

from fed_helpers import write_config, write_site
from tests.conftest import free_port, metric_records, wait_for

pytestmark = pytest.mark.e2e
ROWS = {"alpha": 200, "beta": 300, "gamma": 400, "delta": 16_000}  # delta trains long enough to be killed mid-round
VAL = 0.25


def spawn(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "shoal.cli", "fed", *args], stdout=log.open("w"),
                            stderr=subprocess.STDOUT, env=env)


def read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


@pytest.fixture(scope="module")
def federations(tmp_path_factory, certs_dir):
    root = tmp_path_factory.mktemp("fed")
    data = {site: write_site(root / "data" / site, rows, seed=i) for i, (site, rows) in enumerate(ROWS.items())}
    procs: dict[str, subprocess.Popen] = {}
    runs = {}
    for name, sites in (("plain", list(ROWS)),):
        port = free_port()
        config = write_config(root / f"{name}.toml", certs_dir, root / "runs", name, port, rounds=3,
                              min_clients=len(sites), timeout=8.0)
        procs[f"{name}-server"] = spawn(["server", str(config)], root / f"{name}-server.out")
        for site in sites:
            procs[f"{name}-{site}"] = spawn(["client", str(config), "--data", str(data[site]), "--server",
                                             f"127.0.0.1:{port}", "--name", site, "--audit-dir",
                                             str(root / "audit" / name / site)], root / f"{name}-{site}.out")
        runs[name] = root / "runs" / name
    try:
        server_log = runs["plain"] / "server.log"
        wait_for(lambda: "listening on" in read(server_log), 240, "the server to listen")
        knock(port, certs_dir)
        delta_log = root / "plain-delta.out"
        wait_for(lambda: "round 3: TRAIN task received" in read(delta_log), 240, "delta to start round 3", poll=0.02)
        procs["plain-delta"].send_signal(signal.SIGKILL)  # mid-round: it holds the task and is training
        procs["plain-server"].wait(timeout=240)
        yield root, runs, procs
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def knock(port: int, certs_dir: Path) -> None:
    """A plaintext caller and one with a certificate from another CA: both must be turned away."""
    import grpc

    from shoal.federated import federation_pb2 as pb
    from shoal.federated import federation_pb2_grpc as pb_grpc

    forged = grpc.ssl_channel_credentials((certs_dir / "ca.pem").read_bytes(),
                                          (certs_dir / "other-ca" / "alpha.key").read_bytes(),
                                          (certs_dir / "other-ca" / "alpha.pem").read_bytes())
    for channel in (grpc.insecure_channel(f"127.0.0.1:{port}"), grpc.secure_channel(f"127.0.0.1:{port}", forged)):
        with channel:
            with pytest.raises(grpc.RpcError):
                pb_grpc.FederationStub(channel).Join(pb.JoinRequest(num_samples=1, in_features=6, num_classes=2),
                                                     timeout=10)


def test_round_closes_without_the_killed_client_and_equals_the_weighted_mean(federations):
    root, runs, procs = federations
    assert procs["plain-server"].returncode == 0, read(root / "plain-server.out")
    rows = metric_records(runs["plain"])
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert rows[0]["answered"] >= 3 and rows[1]["answered"] >= 3 and rows[2]["answered"] == 3
    log = read(runs["plain"] / "server.log")
    assert "round 3 TRAIN: no answer from ['delta']" in log
    # the plaintext and the forged caller were refused, and the log says why
    assert "refused a TLS connection: Handshake failed" in log and "WRONG_VERSION_NUMBER" in log
    assert log.count("refused a TLS connection") >= 2
    assert "'alpha' joined" in log and log.count("joined") == 4
    assert "trained" not in read(root / "plain-delta.out").split("round 3: TRAIN task received")[1]
    # FedAvg: the final global model is the sample-weighted mean of what the survivors sent in round 3
    sent = {s: load((root / "audit" / "plain" / s / "round-0003.safetensors").read_bytes())
            for s in ("alpha", "beta", "gamma")}
    weights = {s: ROWS[s] - int(ROWS[s] * VAL) for s in sent}
    final = load_file(str(runs["plain"] / "model.safetensors"))
    for name, tensor in final.items():
        expected = sum(weights[s] * sent[s][name].double() for s in sent) / sum(weights.values())
        torch.testing.assert_close(tensor.double(), expected, rtol=0, atol=1e-6)
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]  # it learned
    for site in ("alpha", "beta", "gamma"):
        assert procs[f"plain-{site}"].wait(timeout=30) == 0
