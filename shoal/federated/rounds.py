"""The server's round driver: sample, hand out tasks, wait with a deadline, aggregate, record.

Synchronous rounds close with whoever answered before `round_timeout`; secure-aggregation
rounds (`secure_rounds.py`) run Bonawitz et al.'s four phases; FedBuff runs without rounds,
applying every `buffer_size` updates as they arrive. Every result is parsed against the task
it answers and the counts its client declared at Join; updates pass the guards of
`aggregate.py` before they change the model. Every round appends a line to
<run dir>/metrics.jsonl and rewrites model.safetensors.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from shoal.config import Config, ConfigError
from shoal.federated import federation_pb2 as pb
from shoal.federated import transport
from shoal.federated.aggregate import Aggregator, RoundLog, mean_loss, saved_model_refusal
from shoal.federated.async_rounds import AsyncRounds
from shoal.federated.local import model_spec
from shoal.federated.mailbox import Mailbox, Stopped
from shoal.federated.privacy import CentralDP
from shoal.federated.secagg import SHARE_BYTES, SHARE_CIPHERTEXT_BYTES
from shoal.federated.secure_rounds import KEY_BYTES, SecureRounds, secagg_threshold
from shoal.federated.strategies import ClientUpdate, Strategy, build_strategy
from shoal.federated.strategies.base import site_spread
from shoal.models import build_model

log = logging.getLogger("shoal.federated.server")


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
    if fed.strategy in ("krum", "multikrum") and fed.min_clients < strategy.min_updates + 1:
        # with exactly min_updates sampled sites, any one dropout would make every round a fallback
        raise ConfigError(f"federated.strategy = '{fed.strategy}' with byzantine = {fed.byzantine} needs "
                          f"federated.min_clients >= {strategy.min_updates + 1} sites: {strategy.min_updates} "
                          f"updates per round (n > 2f + 2) and one to spare for a dropout")


class RoundDriver(SecureRounds, AsyncRounds):
    def __init__(self, cfg: Config, run_dir: Path):
        check_federated(cfg)
        self.cfg, self.fed, self.run_dir = cfg, cfg.federated, run_dir
        dp = CentralDP(self.fed, seed=cfg.train.seed) if self.fed.dp != "off" else None
        self.aggregator = Aggregator(self.fed, build_strategy(self.fed), dp)
        self.dp = dp
        self.rng = random.Random(cfg.train.seed)
        self.mailbox = Mailbox(self.parse)
        self.history: dict[int, torch.Tensor] = {}
        self.last_metrics: dict[str, float] = {}
        self.build_global()
        self.message_limit = transport.message_limit(self.length, self.fed.max_message_mb)
        self.round_log = RoundLog(run_dir, dp, log)

    @property
    def strategy(self) -> Strategy:
        return self.aggregator.strategy

    # --- incoming messages ----------------------------------------------------------------

    def parse(self, client_id: str, task: pb.Task, result: pb.Result) -> Any:
        """Check a result against what its task asked for; BadUpdate names what is wrong."""
        metrics = transport.check_metrics(dict(result.metrics))
        declared = self.mailbox.clients[client_id]
        if task.kind == pb.Task.EVALUATE:
            if not 0 <= result.num_samples <= declared.num_val_samples:
                raise transport.BadUpdate(f"num_samples = {result.num_samples} is outside 0..{declared.num_val_samples}"
                                          f", the held-out count declared at Join")
            return result.num_samples, metrics
        if task.kind == pb.Task.TRAIN:
            if not 0 < result.num_samples <= declared.num_samples:
                raise transport.BadUpdate(f"num_samples = {result.num_samples} is outside 1..{declared.num_samples}, "
                                          f"the count declared at Join")
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
                if len(share.ciphertext) != SHARE_CIPHERTEXT_BYTES:
                    raise transport.BadUpdate(f"an encrypted share has {len(share.ciphertext)} bytes, expected "
                                              f"{SHARE_CIPHERTEXT_BYTES}")
                shares[share.recipient] = bytes(share.ciphertext)
            if set(shares) != peers:
                raise transport.BadUpdate("encrypted shares must cover every peer")
            return shares
        if task.kind == pb.Task.MASK:
            return transport.decode_u64(result.masked, self.length + 2)
        if task.kind == pb.Task.UNMASK:
            every = list(result.self_mask_shares) + list(result.key_shares)
            if any(len(s.value) != SHARE_BYTES for s in every):
                raise transport.BadUpdate(f"every unmasking share must have {SHARE_BYTES} bytes")
            seeds = {s.owner: bytes(s.value) for s in result.self_mask_shares}
            keys = {s.owner: bytes(s.value) for s in result.key_shares}
            if (len(seeds) != len(result.self_mask_shares) or len(keys) != len(result.key_shares)
                    or set(seeds) != set(task.survivors) or set(keys) != set(task.dropped)):
                raise transport.BadUpdate("unmask reply must hold one share per survivor and per dropped client")
            words = {w.owner: int.from_bytes(w.value, "little") for w in result.weight_masks if len(w.value) == 8}
            if len(words) != len(result.weight_masks) or set(words) != (set(task.survivors) | set(task.dropped)) - {
                    client_id}:
                raise transport.BadUpdate("unmask reply must hold one 8-byte weight-slot word per other client")
            return seeds, keys, words
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
            if self.mailbox.stopping:
                raise Stopped(f"stopped in round {rnd}")
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
            if self.mailbox.stopping:
                raise Stopped(f"stopped while waiting for federated.min_clients = {self.fed.min_clients} clients")
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(self.mailbox.live())} of federated.min_clients = "
                                   f"{self.fed.min_clients} clients connected within {self.fed.join_timeout}s")
            with self.mailbox.cond:
                self.mailbox.cond.wait(0.2)
        return self.mailbox.live()

    def build_global(self) -> None:
        """The initial model, shaped by the server's config: no site chooses the federation's model."""
        spec = model_spec(self.fed)
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
        try:
            self.wait_for_clients()
            if self.strategy.asynchronous:
                self.run_async()
            else:
                for rnd in range(1, self.fed.rounds + 1):
                    self.run_round(rnd)
            final = self.evaluate(self.fed.rounds + 1) if self.strategy.asynchronous else self.last_metrics
            self.save()
            return final
        finally:
            self.round_log.close()

    def save(self) -> None:
        """Rewrite model.safetensors, unless the model fails the server's own checks: then the last good
        file stays (a model that got past the guards must not overwrite one that passed them)."""
        reason = saved_model_refusal(self.global_params)
        if reason:
            log.error("model.safetensors not rewritten: the global model %s; the file keeps the last checked model",
                      reason)
            self.round_log.event("model_not_saved", reason=reason)
            return
        save_file(transport.unflatten(self.global_params, self.reference), str(self.run_dir / "model.safetensors"))

    def run_round(self, rnd: int) -> None:
        started = time.monotonic()
        available = self.wait_for_clients()
        chosen, config = self.strategy.configure_train(rnd, available, self.rng)
        config = {**config, **self.model_config}
        log.info("round %d: training on %s", rnd, chosen)
        dropped: list[str] = []
        if self.fed.secagg:
            answered, train_loss = self.secure_round(rnd, chosen, config, len(available))
        else:
            answered, train_loss, dropped = self.plain_round(rnd, chosen, config, len(available))
        metrics = self.evaluate(rnd)
        row = {"round": rnd, "sampled": len(chosen), "answered": answered, "train_loss": train_loss,
               **{f"eval_{k}": v for k, v in metrics.items()}, "seconds": time.monotonic() - started}
        if dropped:
            row["dropped"] = dropped
        if not self.fed.secagg and self.aggregator.fallback:
            row["fallback"] = "coordinate median"
        self.record(row)

    def plain_round(self, rnd: int, chosen: list[str], config: dict[str, float],
                    available: int) -> tuple[int, float, list[str]]:
        """(updates received, mean training loss, clients whose update was dropped as too large)."""
        replies = self.phase(pb.Task.TRAIN, rnd, chosen, model=self.model_bytes(), config=config)
        updates: list[ClientUpdate] = list(replies.values())
        self.aggregator.fallback = ""
        if not updates:
            log.warning("round %d: no valid update arrived; the global model is unchanged", rnd)
            return 0, float("nan"), []
        self.global_params, dropped = self.aggregator.from_updates(rnd, self.global_params, updates, len(chosen),
                                                                   len(chosen) / available)
        if self.aggregator.fallback:
            self.round_log.event("fallback", round=rnd, rule="coordinate median", reason=self.aggregator.fallback)
        return len(updates), mean_loss([u.metrics.get("train_loss", float("nan")) for u in updates]), dropped

    def evaluate(self, rnd: int) -> dict[str, float]:
        clients = self.strategy.configure_evaluate(rnd, self.mailbox.live(), self.rng)
        replies = self.phase(pb.Task.EVALUATE, rnd, clients, model=self.model_bytes(), config=self.model_config)
        results = list(replies.values())
        self.last_metrics = {**self.strategy.aggregate_evaluate(rnd, results), **site_spread(results)}
        return self.last_metrics

    def record(self, row: dict[str, Any]) -> None:
        self.round_log.record(row)
        self.save()
