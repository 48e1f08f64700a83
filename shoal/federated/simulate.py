"""`shoal fed simulate`: thousands of virtual clients on one machine, in a fixed pool of workers.

The pool is `sim_workers` forked processes, each with one model; the dataset and the partition
are built once before forking and shared copy-on-write. A round sends each worker a chunk of
the sampled clients and the global model as raw bytes over a pipe (a JSON header, then
float64 words; nothing pickled); the worker trains its clients one after another with the
same code as a real client (`local.py`). For mean-based strategies a worker returns only the
sum of its clients' updates, so memory is set by the pool, not by the number of clients.
Clients listed as attackers send their update sign-flipped and scaled (robustness benchmarks).
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import random
import struct
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shoal.config import Config, ConfigError
from shoal.data.spec import DataSpec
from shoal.federated import transport
from shoal.federated.local import evaluate, train_local, warm_up
from shoal.federated.partition import load_sim_data, partition
from shoal.federated.aggregate import Aggregator, RoundLog, mean_loss
from shoal.federated.privacy import CentralDP, clip_update
from shoal.federated.rounds import check_federated
from shoal.federated.strategies import ClientUpdate, build_strategy
from shoal.models import build_model

log = logging.getLogger("shoal.federated.simulate")


def _send(conn: Connection, header: dict[str, Any], payload: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    conn.send_bytes(struct.pack("<I", len(raw)) + raw + payload)


def _receive(conn: Connection) -> tuple[dict[str, Any], bytes]:
    message = conn.recv_bytes()
    (size,) = struct.unpack("<I", message[:4])
    return json.loads(message[4:4 + size]), message[4 + size:]


def _worker(conn: Connection, cfg: Config, x: torch.Tensor, y: torch.Tensor, parts: list[np.ndarray],
            spec: DataSpec) -> None:
    """Train the clients it is sent, one at a time, until an empty header says stop."""
    torch.set_num_threads(1)  # the pool is the parallelism; threads would only contend
    model = build_model(cfg.model, spec)
    reference = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    while True:
        header, payload = _receive(conn)
        if not header:
            return
        start = torch.from_numpy(np.frombuffer(payload, dtype=np.float64).copy())
        state = transport.unflatten(start, reference)
        total, weight, unclipped, losses = torch.zeros_like(start), 0.0, 0, []
        each: list[bytes] = []
        clip = header["clip"]
        for cid in header["clients"]:
            ids = torch.from_numpy(parts[cid])
            if len(ids) == 0:
                continue
            model.load_state_dict(state)
            generator = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + header["round"] * 10_007 + cid)
            metrics = train_local(model, x[ids], y[ids], cfg, header["config"], generator)
            delta = transport.flatten(model.state_dict()) - start
            if cid in header["attackers"]:
                delta = -header["attack_scale"] * delta  # sign-flipped and scaled: a poisoning client
            losses.append(metrics["train_loss"])
            if clip is not None:
                delta, fits = clip_update(delta, clip)
                unclipped += int(fits)
                total += delta
                weight += 1.0
            elif header["sum"]:
                total += len(ids) * delta
                weight += len(ids)
            else:
                each.append(struct.pack("<qq", cid, len(ids)) + delta.numpy().tobytes())
        reply = {"weight": weight, "unclipped": unclipped, "losses": losses, "count": len(each)}
        _send(conn, reply, total.numpy().tobytes() if not each else b"".join(each))


class WorkerPool:
    """`size` forked workers; memory is theirs and the parent's, whatever the client count."""

    def __init__(self, size: int, cfg: Config, x: torch.Tensor, y: torch.Tensor, parts: list[np.ndarray],
                 spec: DataSpec):
        context = mp.get_context("fork")  # inherit data and partition; nothing crosses a pickle
        self.conns: list[Connection] = []
        self.procs = []
        for index in range(size):
            parent, child = context.Pipe()
            proc = context.Process(target=_worker, args=(child, cfg, x, y, parts, spec), daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)

    def run(self, header: dict[str, Any], start: torch.Tensor, clients: list[int]) -> list[tuple[dict, bytes]]:
        chunks = [clients[i::len(self.conns)] for i in range(len(self.conns))]
        payload = start.numpy().tobytes()
        for conn, chunk in zip(self.conns, chunks):
            _send(conn, {**header, "clients": chunk}, payload)
        return [_receive(conn) for conn in self.conns]

    def close(self) -> None:
        for conn in self.conns:
            try:
                _send(conn, {})
            except (BrokenPipeError, OSError):
                pass
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()


def simulate(cfg: Config, run_dir: Path, *, attack_fraction: float = 0.0, attack_scale: float = 10.0) -> dict[str, Any]:
    """Run `rounds` of federated training over `sim_clients` virtual clients; returns the summary."""
    fed = cfg.federated
    check_federated(cfg)
    strategy = build_strategy(fed)
    if strategy.asynchronous or fed.secagg:
        raise ConfigError("fed simulate runs synchronous rounds without secure aggregation; use `fed server` and "
                          "`fed client` for fedbuff or secagg")
    began = time.monotonic()
    x, y, x_test, y_test = load_sim_data(cfg)
    spec = DataSpec(kind="classes", in_features=x.shape[1], num_classes=int(max(y.max(), y_test.max())) + 1)
    if fed.in_features and fed.in_features != spec.in_features:
        raise ConfigError(f"federated.in_features = {fed.in_features} but the simulated data has {spec.in_features}")
    if fed.num_classes and fed.num_classes < spec.num_classes:
        raise ConfigError(f"federated.num_classes = {fed.num_classes} but the simulated data has {spec.num_classes}")
    if fed.num_classes:
        spec = DataSpec(kind="classes", in_features=spec.in_features, num_classes=fed.num_classes)
    parts = partition(y.numpy(), fed.sim_clients, fed.partition, alpha=fed.dirichlet_alpha,
                      shards_per_client=fed.shards_per_client, seed=cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, spec)
    reference = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    global_params = transport.flatten(reference)
    rng = random.Random(cfg.train.seed)
    attackers = sorted(rng.sample(range(fed.sim_clients), int(round(attack_fraction * fed.sim_clients))))
    dp = CentralDP(fed, seed=cfg.train.seed) if fed.dp != "off" else None
    aggregator = Aggregator(fed, strategy, dp, bound_updates=False)
    round_log = RoundLog(run_dir, dp, log, total_rounds=fed.rounds)
    workers = max(1, min(fed.sim_workers, fed.sim_clients))
    log.info("simulating %d clients (%s partition, %d non-empty) on %d workers; %d samples, %d test",
             fed.sim_clients, fed.partition, sum(len(p) > 0 for p in parts), workers, len(x), len(x_test))
    warm_up(cfg)  # before forking, so the workers inherit the lazily imported optimizer code
    pool = WorkerPool(workers, cfg, x, y, parts, spec)
    summary: dict[str, Any] = {}
    try:
        all_ids = [str(i) for i in range(fed.sim_clients)]
        for rnd in range(1, fed.rounds + 1):
            started = time.monotonic()
            chosen_names, config = aggregator.strategy.configure_train(rnd, all_ids, rng)
            chosen = sorted(int(c) for c in chosen_names)
            header = {"round": rnd, "config": config, "attackers": attackers, "attack_scale": attack_scale,
                      "clip": dp.clip if dp else None, "sum": aggregator.strategy.linear}
            replies = pool.run(header, global_params, chosen)
            losses = [loss for h, _ in replies for loss in h["losses"]]
            names = [str(c) for c in chosen]
            if dp is not None or aggregator.strategy.linear:  # the workers sent sums, as secure aggregation does
                total = sum(torch.from_numpy(np.frombuffer(p, dtype=np.float64).copy()) for _, p in replies)
                global_params = aggregator.from_sum(rnd, global_params, total, sum(h["weight"] for h, _ in replies),
                                                    len(chosen), sum(h["unclipped"] for h, _ in replies),
                                                    len(chosen) / fed.sim_clients, names)
            else:
                updates = _unpack_updates(replies, global_params.numel())
                if updates:
                    global_params, _ = aggregator.from_updates(rnd, global_params, updates, len(chosen),
                                                               len(chosen) / fed.sim_clients)
            model.load_state_dict(transport.unflatten(global_params, reference))
            metrics = evaluate(model, x_test, y_test)
            row = {"round": rnd, "sampled": len(chosen), "train_loss": mean_loss(losses),
                   **{f"eval_{k}": v for k, v in metrics.items()}, "seconds": time.monotonic() - started}
            round_log.record(row)
            summary = {**row, "clients": fed.sim_clients, "workers": workers, "attackers": len(attackers)}
    finally:
        pool.close()
        round_log.close()
    from safetensors.torch import save_file

    save_file(transport.unflatten(global_params, reference), str(run_dir / "model.safetensors"))
    summary["total_seconds"] = time.monotonic() - began
    return summary


def _unpack_updates(replies: list[tuple[dict, bytes]], length: int) -> list[ClientUpdate]:
    updates = []
    record = 16 + 8 * length
    for header, payload in replies:
        for i in range(header["count"]):
            chunk = payload[i * record:(i + 1) * record]
            cid, samples = struct.unpack("<qq", chunk[:16])
            delta = torch.from_numpy(np.frombuffer(chunk[16:], dtype=np.float64).copy())
            updates.append(ClientUpdate(str(cid), delta, samples))
    return updates
