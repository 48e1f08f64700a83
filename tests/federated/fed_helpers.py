"""Helpers shared by the federated tests: site datasets, free ports, a tiny federation config,
a TLS channel as a given site, and a server with its round driver in this process."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import numpy as np

SITES = ("alpha", "beta", "gamma", "delta")


def write_site(folder: Path, rows: int, seed: int, features: int = 6) -> Path:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, features)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "x.npy", x)
    np.save(folder / "y.npy", y)
    return folder


CONFIG = """
[model]
name = "mlp"
dim = 8
n_layers = 1

[train]
optimizer = "sgd"
lr = 0.1
batch_size = 16
weight_decay = 0.0
grad_clip = 0.0

[data]
val_fraction = 0.25

[federated]
in_features = 6
num_classes = 2
certs_dir = "{certs}"
address = "127.0.0.1:{port}"
rounds = {rounds}
min_clients = {min_clients}
round_timeout = {timeout}
join_timeout = 120

[log]
dir = "{runs}"
name = "{name}"
"""


def write_config(path: Path, certs: Path, runs: Path, name: str, port: int, rounds: int = 2, min_clients: int = 3,
                 timeout: float = 30.0, extra: str = "") -> Path:
    path.write_text(CONFIG.format(certs=certs, runs=runs, name=name, port=port, rounds=rounds,
                                  min_clients=min_clients, timeout=timeout) + extra)
    return path


def channel(port: int, certs: Path, name: str, ca: Path | None = None) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials((ca or certs / "ca.pem").read_bytes(), (certs / f"{name}.key").read_bytes(),
                                         (certs / f"{name}.pem").read_bytes())
    return grpc.secure_channel(f"127.0.0.1:{port}", creds)


def start_federation(cfg, tmp_path):
    """The gRPC server and a thread driving the rounds; `done` is set when the driver returns."""
    from shoal.federated.mailbox import Stopped
    from shoal.federated.rounds import RoundDriver
    from shoal.federated.server import start_grpc

    run_dir = tmp_path / "runs" / cfg.log.name
    run_dir.mkdir(parents=True)
    driver = RoundDriver(cfg, run_dir)
    server, port = start_grpc(cfg, driver, cfg.log.name)
    done = threading.Event()

    def drive():
        try:
            driver.run()
        except Stopped:
            pass
        finally:
            driver.mailbox.stop()
            done.set()

    threading.Thread(target=drive, daemon=True).start()
    return server, port, driver, run_dir, done


def stop_federation(server, driver, done) -> None:
    """End the driver thread (it must not outlive its test) and the server."""
    driver.mailbox.stop()
    server.stop(0)
    assert done.wait(30), "the round driver did not stop"
