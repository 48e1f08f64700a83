"""The server's round driver: sample, hand out tasks, wait with a deadline, aggregate, record.

Synchronous rounds close with whoever answered before `round_timeout`; secure-aggregation
rounds run Bonawitz et al.'s four phases (train+keys, share keys, masked input, unmask);
FedBuff runs without rounds, applying every `buffer_size` updates as they arrive.
Every round appends a line to <run dir>/metrics.jsonl and rewrites model.safetensors.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from shoal.config import Config, ConfigError
from shoal.data.spec import DataSpec
from shoal.federated import federation_pb2 as pb
from shoal.federated import transport
from shoal.federated.privacy import CentralDP, clip_update
from shoal.federated.secagg import SecAggServer, dequantize
from shoal.federated.server import Mailbox
from shoal.federated.strategies import ClientUpdate, build_strategy
from shoal.models import build_model

log = logging.getLogger("shoal.federated.server")
KEY_BYTES = 32


def check_federated(cfg: Config) -> None:
    """Rules that span [federated] fields, checked before anything starts."""
    fed = cfg.federated
    strategy = build_strategy(fed)
    threshold = secagg_threshold(cfg, fed.min_clients)
    if fed.secagg:
        if strategy.asynchronous or not strategy.linear:
            raise ConfigError(f"federated.secagg needs a strategy that uses only the mean update (fedavg, fedprox, "
                              f"fedadam, fedyogi, fedadagrad), not '{fed.strategy}'")
        if fed.min_clients < threshold or fed.min_clients < 3:
            raise ConfigError(f"federated.secagg with threshold {threshold} needs federated.min_clients >= "
                              f"{max(3, threshold)}, got {fed.min_clients}")
    if fed.dp != "off" and (strategy.asynchronous or not strategy.linear):
        raise ConfigError(f"federated.dp needs a mean-based strategy (fedavg, fedprox, fedadam, fedyogi, "
                          f"fedadagrad), not '{fed.strategy}'")
    if fed.dp == "adaptive" and fed.dp_noise > 0:
        count_std = fed.min_clients / 20.0  # the count noise of Andrew et al., as in privacy.CentralDP
        if fed.dp_noise <= 1 / (2 * count_std):
            raise ConfigError(f"federated.dp_noise = {fed.dp_noise} is too small for adaptive clipping with "
                              f"{fed.min_clients} clients: the clipped-count noise needs dp_noise > "
                              f"{1 / (2 * count_std):.3g} (sample more clients or use dp = 'fixed')")
    if fed.strategy in ("krum", "multikrum") and fed.min_clients <= 2 * fed.byzantine + 2:
        raise ConfigError(f"federated.strategy = '{fed.strategy}' with byzantine = {fed.byzantine} needs "
                          f"federated.min_clients > {2 * fed.byzantine + 2}")


def secagg_threshold(cfg: Config, sampled: int) -> int:
    return cfg.federated.secagg_threshold or sampled // 2 + 1


class RoundDriver:
    def __init__(self, cfg: Config, run_dir: Path):
        check_federated(cfg)
        self.cfg, self.fed, self.run_dir = cfg, cfg.federated, run_dir
        self.strategy = build_strategy(self.fed)
        self.dp = CentralDP(self.fed, seed=cfg.train.seed) if self.fed.dp != "off" else None
        self.rng = random.Random(cfg.train.seed)
        self.mailbox = Mailbox(self.parse)
        self.reference: dict[str, torch.Tensor] = {}
        self.global_params = torch.zeros(0, dtype=torch.float64)
        self.model_config: dict[str, float] = {}
        self.history: dict[int, torch.Tensor] = {}
        self.length = 0
        self.last_metrics: dict[str, float] = {}

    # --- incoming messages ----------------------------------------------------------------

    def parse(self, client_id: str, task: pb.Task, result: pb.Result) -> Any:
        """Check a result against what its task asked for; BadUpdate names what is wrong."""
        metrics = transport.check_metrics(dict(result.metrics))
        if task.kind == pb.Task.EVALUATE:
            if result.num_samples < 0:
                raise transport.BadUpdate("negative sample count")
            return result.num_samples, metrics
        if task.kind == pb.Task.TRAIN:
            if not 0 < result.num_samples < 10 ** 12:
                raise transport.BadUpdate(f"num_samples = {result.num_samples} is out of range")
            if task.config.get("secagg"):
                keys = result.keys
                if len(keys.cipher_pk) != KEY_BYTES or len(keys.mask_pk) != KEY_BYTES:
                    raise transport.BadUpdate("secure aggregation keys must be 32-byte X25519 keys")
                return (bytes(keys.cipher_pk), bytes(keys.mask_pk)), metrics
            tensors = transport.decode_model(result.model, self.reference)
            base = self.history.get(task.model_version, self.global_params)
            return ClientUpdate(client_id, transport.flatten(tensors) - base, result.num_samples, metrics,
                                base_version=task.model_version)
        if task.kind == pb.Task.SHARE_KEYS:
            peers = {p.client_id for p in task.peers}
            shares = {}
            for share in result.shares:
                if share.sender != client_id or share.recipient not in peers or share.recipient in shares:
                    raise transport.BadUpdate("encrypted shares must go from the sender to each peer once")
                shares[share.recipient] = bytes(share.ciphertext)
            if set(shares) != peers:
                raise transport.BadUpdate("encrypted shares must cover every peer")
            return shares
        if task.kind == pb.Task.MASK:
            return transport.decode_u64(result.masked, self.length + 2)
        if task.kind == pb.Task.UNMASK:
            seeds = {s.owner: bytes(s.value) for s in result.self_mask_shares}
            keys = {s.owner: bytes(s.value) for s in result.key_shares}
            if set(seeds) != set(task.survivors) or set(keys) != set(task.dropped):
                raise transport.BadUpdate("unmask reply must hold one share per survivor and per dropped client")
            return seeds, keys
        raise transport.BadUpdate(f"unexpected result for a {pb.Task.Kind.Name(task.kind)} task")

    # --- phases ------------------------------------------------------------------------------

    def phase(self, kind: int, rnd: int, clients: list[str], **fields: Any) -> dict[str, Any]:
        """Send one task to each client and collect valid replies until all arrive or the deadline."""
        per_client = fields.pop("per_client", None)
        for cid in clients:
            extra = per_client(cid) if per_client else {}
            self.mailbox.assign(cid, pb.Task(kind=kind, round=rnd, **fields, **extra))
        deadline = time.monotonic() + self.fed.round_timeout
        answered: dict[str, Any] = {}
        heard: set[str] = set()
        while len(heard) < len(clients) and time.monotonic() < deadline:
            self.mailbox.wait_replies(deadline)
            for reply in self.mailbox.take():
                if reply.round == rnd and reply.kind == kind and reply.client_id in clients:
                    heard.add(reply.client_id)
                    if reply.result is not None:
                        answered[reply.client_id] = reply.result
        self.mailbox.cancel(clients)
        silent = sorted(set(clients) - heard)
        self.mailbox.suspect(silent)
        if silent:
            log.warning("round %d %s: no answer from %s within %.1fs; closing with %d of %d", rnd,
                        pb.Task.Kind.Name(kind), silent, self.fed.round_timeout, len(answered), len(clients))
        return answered

    def wait_for_clients(self) -> list[str]:
        deadline = time.monotonic() + self.fed.join_timeout
        while len(self.mailbox.live()) < self.fed.min_clients:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(self.mailbox.live())} of federated.min_clients = "
                                   f"{self.fed.min_clients} clients connected within {self.fed.join_timeout}s")
            with self.mailbox.cond:
                self.mailbox.cond.wait(0.2)
        return self.mailbox.live()

    def build_global(self) -> None:
        """The initial model, shaped by what the first clients reported about their data."""
        with self.mailbox.cond:
            infos = list(self.mailbox.clients.values())
        spec = DataSpec(kind="classes", in_features=infos[0].in_features,
                        num_classes=max(i.num_classes for i in infos))
        torch.manual_seed(self.cfg.train.seed)
        model = build_model(self.cfg.model, spec)
        self.reference = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
        self.global_params = transport.flatten(self.reference)
        self.length = self.global_params.numel()
        self.model_config = {"in_features": float(spec.in_features), "num_classes": float(spec.num_classes)}
        log.info("model: %s with %d parameters for %d features and %d classes", self.cfg.model.name, self.length,
                 spec.in_features, spec.num_classes)

    def model_bytes(self) -> bytes:
        return transport.encode_model(transport.unflatten(self.global_params, self.reference))

    # --- the run -------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        self.wait_for_clients()
        self.build_global()
        if self.strategy.asynchronous:
            self.run_async()
        else:
            for rnd in range(1, self.fed.rounds + 1):
                self.run_round(rnd)
        final = self.evaluate(self.fed.rounds + 1) if self.strategy.asynchronous else self.last_metrics
        save_file(transport.unflatten(self.global_params, self.reference), str(self.run_dir / "model.safetensors"))
        return final

    def run_round(self, rnd: int) -> None:
        started = time.monotonic()
        available = self.wait_for_clients()
        chosen, config = self.strategy.configure_train(rnd, available, self.rng)
        config = {**config, **self.model_config}
        log.info("round %d: training on %s", rnd, chosen)
        if self.fed.secagg:
            answered, train_loss = self.secure_round(rnd, chosen, config, len(available))
        else:
            answered, train_loss = self.plain_round(rnd, chosen, config, len(available))
        metrics = self.evaluate(rnd)
        self.record({"round": rnd, "sampled": len(chosen), "answered": answered, "train_loss": train_loss,
                     **{f"eval_{k}": v for k, v in metrics.items()}, "seconds": time.monotonic() - started})

    def plain_round(self, rnd: int, chosen: list[str], config: dict[str, float], available: int) -> tuple[int, float]:
        replies = self.phase(pb.Task.TRAIN, rnd, chosen, model=self.model_bytes(), config=config)
        updates: list[ClientUpdate] = list(replies.values())
        if not updates:
            log.warning("round %d: no valid update arrived; the global model is unchanged", rnd)
            return 0, math.nan
        if self.dp is not None:
            clipped = [clip_update(u.delta, self.dp.clip) for u in updates]
            total = torch.stack([c for c, _ in clipped]).sum(0)
            mean = self.dp.noisy_mean(total, len(chosen), sum(ok for _, ok in clipped), len(chosen) / available)
            self.global_params = self.strategy.apply_mean(rnd, self.global_params, mean)
        else:
            try:
                self.global_params = self.strategy.aggregate_train(rnd, self.global_params, updates)
            except ValueError as err:
                log.error("round %d: %s; the global model is unchanged", rnd, err)
        return len(updates), float(np.mean([u.metrics.get("train_loss", math.nan) for u in updates]))

    def secure_round(self, rnd: int, chosen: list[str], config: dict[str, float],
                     available: int) -> tuple[int, float]:
        threshold = secagg_threshold(self.cfg, len(chosen))
        config = {**config, "secagg": 1.0, "secagg_threshold": float(threshold)}
        if self.dp is not None:
            config["dp_clip"] = self.dp.clip  # clients clip: the server never sees one update
        keys = self.phase(pb.Task.TRAIN, rnd, chosen, model=self.model_bytes(), config=config)
        if not self._enough(rnd, "advertised keys", keys, threshold):
            return 0, math.nan
        peers = {cid: k for cid, (k, _) in keys.items()}
        peer_msgs = [pb.PublicKeys(client_id=c, cipher_pk=k[0], mask_pk=k[1]) for c, k in sorted(peers.items())]
        shares = self.phase(pb.Task.SHARE_KEYS, rnd, sorted(peers), peers=peer_msgs, config=config)
        if not self._enough(rnd, "shared keys", shares, threshold):
            return 0, math.nan

        def addressed_to(cid: str) -> dict[str, Any]:
            return {"shares": [pb.EncryptedShare(sender=s, recipient=cid, ciphertext=out[cid])
                               for s, out in sorted(shares.items())]}

        masked = self.phase(pb.Task.MASK, rnd, sorted(shares), per_client=addressed_to, config=config)
        if not self._enough(rnd, "sent masked input", masked, threshold):
            return 0, math.nan
        survivors, dropped = sorted(masked), sorted(set(shares) - set(masked))
        unmask = self.phase(pb.Task.UNMASK, rnd, survivors, survivors=survivors, dropped=dropped, config=config)
        if not self._enough(rnd, "sent unmasking shares", unmask, threshold):
            return 0, math.nan
        seed_shares: dict[str, dict[str, bytes]] = {}
        key_shares: dict[str, dict[str, bytes]] = {}
        for holder, (seeds, ks) in unmask.items():
            for owner, value in seeds.items():
                seed_shares.setdefault(owner, {})[holder] = value
            for owner, value in ks.items():
                key_shares.setdefault(owner, {})[holder] = value
        try:
            total = SecAggServer(threshold).unmask_sum(peers, set(shares), masked, seed_shares, key_shares)
        except ValueError as err:
            log.error("round %d: secure aggregation failed (%s); the global model is unchanged", rnd, err)
            return 0, math.nan
        summed = torch.from_numpy(dequantize(total))
        delta_sum, weight, unclipped = summed[:self.length], float(summed[self.length]), float(summed[-1])
        if dropped:
            log.info("round %d: %s dropped after sharing keys; their masks were removed", rnd, dropped)
        if self.dp is not None:
            mean = self.dp.noisy_mean(delta_sum, len(chosen), unclipped, len(chosen) / available)
        else:
            mean = delta_sum / max(weight, 1e-12)
        self.global_params = self.strategy.apply_mean(rnd, self.global_params, mean)
        losses = [m.get("train_loss", math.nan) for _, m in keys.values()]
        return len(masked), float(np.mean(losses))

    def _enough(self, rnd: int, what: str, replies: dict[str, Any], threshold: int) -> bool:
        if len(replies) >= threshold:
            return True
        log.error("round %d: only %d clients %s, below the secure aggregation threshold %d; the global model "
                  "is unchanged", rnd, len(replies), what, threshold)
        return False

    def run_async(self) -> None:
        """FedBuff: keep every live client busy; apply each full buffer as one server version."""
        version, buffer, started = 0, [], time.monotonic()
        self.history = {0: self.global_params.clone()}
        busy: set[str] = set()
        deadline = time.monotonic() + self.fed.join_timeout
        while version < self.fed.rounds:
            if time.monotonic() > deadline:
                raise RuntimeError(f"fedbuff: no update for {self.fed.join_timeout}s; stopping at version {version}")
            for cid in self.mailbox.live():
                if cid not in busy:
                    self.mailbox.assign(cid, pb.Task(kind=pb.Task.TRAIN, round=version, model_version=version,
                                                     model=self.model_bytes(), config=self.model_config))
                    busy.add(cid)
            self.mailbox.wait_replies(time.monotonic() + 1.0)
            for reply in self.mailbox.take():
                busy.discard(reply.client_id)
                update = reply.result
                if not isinstance(update, ClientUpdate):
                    continue
                deadline = time.monotonic() + self.fed.join_timeout
                if version - update.base_version > self.fed.max_staleness:
                    log.warning("fedbuff: dropped an update from %s that is %d versions stale", update.client_id,
                                version - update.base_version)
                    continue
                buffer.append(update)
                if len(buffer) >= self.fed.buffer_size:
                    version += 1
                    self.global_params = self.strategy.aggregate_train(version, self.global_params, buffer)
                    self.history[version] = self.global_params.clone()
                    self.history.pop(version - self.fed.max_staleness - 1, None)
                    self.record({"round": version, "answered": len(buffer),
                                 "staleness": [version - 1 - u.base_version for u in buffer],
                                 "train_loss": float(np.mean([u.metrics.get("train_loss", math.nan) for u in buffer])),
                                 "seconds": time.monotonic() - started})
                    buffer, started = [], time.monotonic()
                    if version >= self.fed.rounds:
                        break
        self.mailbox.cancel(sorted(busy))

    def evaluate(self, rnd: int) -> dict[str, float]:
        clients = self.strategy.configure_evaluate(rnd, self.mailbox.live(), self.rng)
        replies = self.phase(pb.Task.EVALUATE, rnd, clients, model=self.model_bytes(), config=self.model_config)
        self.last_metrics = self.strategy.aggregate_evaluate(rnd, list(replies.values()))
        return self.last_metrics

    def record(self, row: dict[str, Any]) -> None:
        if self.dp is not None:
            row["epsilon"] = self.dp.epsilon()
            row["dp_clip"] = self.dp.clip
        log.info("round %d: %s", row["round"], ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if k != "round"))
        with open(self.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
        save_file(transport.unflatten(self.global_params, self.reference), str(self.run_dir / "model.safetensors"))
