"""The federated client: keeps its data local, pulls tasks from the server, pushes results.

Everything it sends is a protobuf message: a safetensors model, public keys, encrypted
shares or a masked vector. A failure while working on a task is sent to the server as a
traceback (so the server log shows it) and the client carries on with the next task.
With `audit_dir`, every model or masked vector that leaves the site is also written there.
"""

from __future__ import annotations

import logging
import random
import time
import traceback
import zlib
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from shoal.config import Config, ConfigError
from shoal.data import datasets
from shoal.federated import federation_pb2 as pb
from shoal.federated import federation_pb2_grpc as pb_grpc
from shoal.federated import transport
from shoal.federated.local import evaluate, model_spec, train_local, warm_up
from shoal.federated.privacy import clip_update
from shoal.federated.secagg import SecAggClient
from shoal.models import build_model

log = logging.getLogger("shoal.federated.client")
# What a busy or briefly unreachable server answers (a full gate, a slow handshake): worth retrying with
# backoff until the round's deadline. CANCELLED is a server that stopped.
RETRY = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
BACKOFF_START, BACKOFF_MAX = 0.5, 8.0


def load_site_data(path: str, val_fraction: float) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_val, y_val) from a folder with x.npy and y.npy (integer labels)."""
    try:
        x, y = datasets.npy_arrays(path)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if y.dtype.is_floating_point or y.ndim != 1:
        raise ConfigError(f"--data {path}: y.npy must hold one integer class label per row")
    if len(x) < 2 or int(y.min()) < 0:
        raise ConfigError(f"--data {path}: need at least 2 rows and labels >= 0")
    y = y.long()
    n_val = int(len(x) * val_fraction)
    return x[:len(x) - n_val], y[:len(x) - n_val], x[len(x) - n_val:], y[len(x) - n_val:]


class FederatedClient:
    def __init__(self, cfg: Config, data_path: str, server: str, name: str, audit_dir: Path | None = None):
        self.cfg, self.name, self.server, self.audit_dir = cfg, name, server, audit_dir
        self.x, self.y, self.x_val, self.y_val = load_site_data(data_path, cfg.data.val_fraction)
        spec = model_spec(cfg.federated)
        if self.x.shape[1] != spec.in_features:
            raise ConfigError(f"--data {data_path}: x.npy has {self.x.shape[1]} columns; federated.in_features = "
                              f"{spec.in_features}")
        labels = int(torch.cat([self.y, self.y_val]).max()) + 1
        self.num_classes = labels
        if labels > spec.num_classes:
            raise ConfigError(f"--data {data_path}: this site has label {labels - 1} but federated.num_classes = "
                              f"{spec.num_classes}")
        self.model = build_model(cfg.model, spec)
        self.reference = {k: v.detach().float() for k, v in self.model.state_dict().items()}
        limit = transport.message_limit(sum(t.numel() for t in self.reference.values()), cfg.federated.max_message_mb)
        credentials = transport.client_credentials(Path(cfg.federated.certs_dir), name)
        self.channel = grpc.secure_channel(server, credentials, options=transport.channel_options(limit))
        self.stub = pb_grpc.FederationStub(self.channel)
        self.secagg: SecAggClient | None = None
        self.pending_vector: np.ndarray | None = None
        seed = zlib.crc32(name.encode()) ^ cfg.train.seed  # a site's own stream, stable across restarts
        self.generator = torch.Generator().manual_seed(seed)
        self.jitter = random.Random(seed)
        self.privacy_engine: Any = None
        if cfg.federated.local_dp:
            from opacus import PrivacyEngine

            self.privacy_engine = PrivacyEngine(accountant="rdp")
        warm_up(cfg)

    def join(self, timeout: float) -> None:
        """Register with the server, retrying while it is not up yet."""
        deadline = time.monotonic() + timeout
        request = pb.JoinRequest(num_samples=len(self.x), num_val_samples=len(self.x_val),
                                 in_features=self.x.shape[1], num_classes=self.num_classes)
        try:
            reply = self.call(self.stub.Join, request, 10.0, deadline)
        except grpc.RpcError as err:  # refused (bad or revoked certificate) or unreachable: one line
            raise ConfigError(f"cannot join {self.server} as '{self.name}': {err.code().name}: "
                              f"{err.details()}") from None
        log.info("joined run '%s' as '%s' with %d samples", reply.run, reply.client_id, len(self.x))

    def call(self, method: Any, request: Any, timeout: float, deadline: float) -> Any:
        """One RPC, retried on UNAVAILABLE and DEADLINE_EXCEEDED with exponential backoff (and jitter, so
        sites turned away together do not return together) until `deadline`; then its last error is raised."""
        pause = BACKOFF_START
        while True:
            try:
                return method(request, timeout=timeout)
            except grpc.RpcError as err:
                if err.code() not in RETRY or time.monotonic() + pause > deadline:
                    raise
                log.info("server busy or unreachable (%s); retrying in %.1fs", err.code().name, pause)
                time.sleep(pause * (0.5 + 0.5 * self.jitter.random()))
                pause = min(2 * pause, BACKOFF_MAX)

    def run(self, join_timeout: float = 60.0) -> int:
        self.join(join_timeout)
        patience = self.cfg.federated.round_timeout  # a server silent for a whole round is gone
        while True:
            try:
                task = self.call(self.stub.GetTask, pb.TaskRequest(), 30.0, time.monotonic() + patience)
            except grpc.RpcError as err:
                if err.code() in RETRY + (grpc.StatusCode.CANCELLED,):
                    log.info("server gone (%s); stopping", err.details())
                    return 0
                raise
            if task.kind == pb.Task.STOP:
                log.info("server says the federation is finished")
                return 0
            if task.kind == pb.Task.WAIT:
                continue
            log.info("round %d: %s task received", task.round, pb.Task.Kind.Name(task.kind))
            round_deadline = time.monotonic() + patience  # the server closes the phase by then: no later retry
            result = pb.Result(round=task.round, task_id=task.task_id)
            try:
                self.work(task, result)
            except Exception:  # any failure is the server's to see, with its traceback
                result = pb.Result(round=task.round, task_id=task.task_id, error=traceback.format_exc())
                log.error("round %d: %s failed:\n%s", task.round, pb.Task.Kind.Name(task.kind), result.error)
            try:
                ack = self.call(self.stub.Submit, result, 60.0, round_deadline)
            except grpc.RpcError as err:
                if err.code() in RETRY + (grpc.StatusCode.CANCELLED,):  # the federation ended while this site worked
                    log.info("server gone before our %s answer (%s); stopping", pb.Task.Kind.Name(task.kind),
                             err.details())
                    return 0
                raise
            if not ack.accepted:
                log.warning("round %d: server refused our %s: %s", task.round, pb.Task.Kind.Name(task.kind),
                            ack.reason)

    def _load(self, task: pb.Task) -> torch.nn.Module:
        """The global model of this task, checked against the shape this site's config defines."""
        self.model.load_state_dict(transport.decode_model(task.model, self.reference))
        return self.model

    def work(self, task: pb.Task, result: pb.Result) -> None:
        config = dict(task.config)
        if task.kind == pb.Task.EVALUATE:
            model = self._load(task)
            result.num_samples = len(self.x_val)
            result.metrics.update(evaluate(model, self.x_val, self.y_val))
        elif task.kind == pb.Task.TRAIN:
            model = self._load(task)
            start = transport.flatten(model.state_dict())
            result.num_samples = len(self.x)
            result.metrics.update(train_local(model, self.x, self.y, self.cfg, config, self.generator,
                                              self.privacy_engine))
            log.info("round %d: trained on %d samples, loss %.4f", task.round, len(self.x),
                     result.metrics["train_loss"])
            if config.get("secagg"):
                self.pending_vector = self._secagg_vector(transport.flatten(model.state_dict()) - start, config)
                self.secagg = SecAggClient(self.name, int(config["secagg_threshold"]))
                cipher_pk, mask_pk = self.secagg.public_keys()
                result.keys.CopyFrom(pb.PublicKeys(client_id=self.name, cipher_pk=cipher_pk, mask_pk=mask_pk))
            else:
                result.model = transport.encode_model(model.state_dict())
                self._audit(task.round, result.model, "safetensors")
        elif task.kind == pb.Task.SHARE_KEYS:
            assert self.secagg is not None, "SHARE_KEYS before TRAIN"
            peers = {p.client_id: (bytes(p.cipher_pk), bytes(p.mask_pk)) for p in task.peers}
            for recipient, blob in self.secagg.share_keys(peers).items():
                result.shares.append(pb.EncryptedShare(sender=self.name, recipient=recipient, ciphertext=blob))
        elif task.kind == pb.Task.MASK:
            assert self.secagg is not None and self.pending_vector is not None, "MASK before TRAIN"
            received = {s.sender: bytes(s.ciphertext) for s in task.shares if s.recipient == self.name}
            result.masked = transport.encode_u64(self.secagg.mask(self.pending_vector, received))
            self._audit(task.round, result.masked, "masked")
        elif task.kind == pb.Task.UNMASK:
            assert self.secagg is not None, "UNMASK before MASK"
            seeds, keys = self.secagg.unmask(list(task.survivors), list(task.dropped))
            result.self_mask_shares.extend(pb.Share(owner=o, value=v) for o, v in seeds.items())
            result.key_shares.extend(pb.Share(owner=o, value=v) for o, v in keys.items())
            assert self.pending_vector is not None
            weight_slot = len(self.pending_vector) - 2  # [update, weight, unclipped]
            result.weight_masks.extend(pb.Share(owner=o, value=w.to_bytes(8, "little"))
                                       for o, w in sorted(self.secagg.pairwise_words(weight_slot).items()))

    def _secagg_vector(self, delta: torch.Tensor, config: dict[str, float]) -> np.ndarray:
        """[weighted update, weight, unclipped]: the server learns only the sums of these."""
        if "dp_clip" in config:
            clipped, unclipped = clip_update(delta, config["dp_clip"])
            return torch.cat([clipped, torch.tensor([1.0, float(unclipped)], dtype=torch.float64)]).numpy()
        weight = float(config.get("secagg_weight", len(self.x)))  # set by the server from our Join
        return torch.cat([delta * weight, torch.tensor([weight, 0.0], dtype=torch.float64)]).numpy()

    def _audit(self, rnd: int, payload: bytes, suffix: str) -> None:
        """Keep a copy of what left the site: sites often must be able to show it."""
        if self.audit_dir is None:
            return
        self.audit_dir.mkdir(parents=True, exist_ok=True)
        (self.audit_dir / f"round-{rnd:04d}.{suffix}").write_bytes(payload)
