"""gRPC over mutual TLS, and the encoding of models on the wire.

Models travel as safetensors bytes inside protobuf messages and are checked against the
expected names, shapes and dtype before anyone uses them; masked vectors travel as raw
little-endian uint64. Nothing is pickled. The message limit is the model's own size plus a
margin: large enough that a model is never capped by gRPC's 4 MiB default, small enough that
gRPC refuses an oversized message from its length prefix instead of reading it whole.
"""

from __future__ import annotations

import math
from pathlib import Path

import grpc
import numpy as np
import torch
from cryptography import x509
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from shoal.config import ConfigError

# safetensors' header is JSON of names and shapes; this is generous room for it
HEADER_SLACK = 64 * 1024
# room beside the model in one message: protobuf framing, metrics, and secure aggregation's
# keys and shares (about 250 bytes per peer, so some 4,000 peers per round)
MESSAGE_MARGIN = 1024 * 1024
MAX_METRICS = 32  # metrics in one reply
MAX_METRIC_NAME = 64
MAX_METRIC_ABS = 1e15  # far above any loss or accuracy; keeps the weighted means finite
# streams one client may have open at once: it needs two (a GetTask poll and a Submit), and each
# may hold a message up to the limit in server memory
MAX_STREAMS = 4


class BadUpdate(ValueError):
    """A peer's message that must not reach the aggregate (shape, dtype, NaN, size, replay)."""


def message_limit(num_params: int, max_message_mb: int) -> int:
    """Bytes the largest legitimate message can take: a float32 model or a masked uint64 vector, plus margin."""
    payload = max(4 * num_params + HEADER_SLACK, 8 * (num_params + 2))
    limit = payload + MESSAGE_MARGIN
    if limit > max_message_mb * 1024 * 1024:
        raise ConfigError(f"the model needs messages of {limit / 2 ** 20:.1f} MiB, above federated.max_message_mb = "
                          f"{max_message_mb}")
    return limit


def channel_options(limit: int, server: bool = False) -> list[tuple[str, int]]:
    """gRPC options with `limit` bytes (from `message_limit`) for each message, both ways."""
    options = [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit),
               ("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_permit_without_calls", 1),
               ("grpc.http2.max_pings_without_data", 0)]
    return options + [("grpc.max_concurrent_streams", MAX_STREAMS)] if server else options


def _read(path: Path) -> bytes:
    if not path.is_file():
        raise ConfigError(f"certificate file {path} not found (make them with `shoal fed certs`)")
    return path.read_bytes()


def server_credentials(certs_dir: Path) -> grpc.ServerCredentials:
    """TLS that demands a client certificate signed by the federation's CA."""
    return grpc.ssl_server_credentials([(_read(certs_dir / "server.key"), _read(certs_dir / "server.pem"))],
                                       root_certificates=_read(certs_dir / "ca.pem"), require_client_auth=True)


def client_credentials(certs_dir: Path, name: str) -> grpc.ChannelCredentials:
    """TLS that checks the server against the CA and presents this client's certificate."""
    return grpc.ssl_channel_credentials(root_certificates=_read(certs_dir / "ca.pem"),
                                        private_key=_read(certs_dir / f"{name}.key"),
                                        certificate_chain=_read(certs_dir / f"{name}.pem"))


def peer_certificate(context: grpc.ServicerContext) -> x509.Certificate | None:
    """The certificate the caller presented in the TLS handshake (None without one)."""
    pem = context.auth_context().get("x509_pem_cert")
    return x509.load_pem_x509_certificate(pem[0]) if pem else None


def encode_model(tensors: dict[str, torch.Tensor]) -> bytes:
    return st_save({k: v.detach().to(torch.float32).contiguous() for k, v in tensors.items()})


def decode_model(data: bytes, reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes and check them against the reference model, naming what is wrong."""
    expected = sum(t.numel() * 4 for t in reference.values()) + HEADER_SLACK
    if len(data) > expected:
        raise BadUpdate(f"oversized model: {len(data)} bytes where at most {expected} are expected")
    try:
        tensors = st_load(data)
    except Exception as err:  # safetensors raises its own error types for malformed bytes
        raise BadUpdate(f"malformed model bytes: {err}") from None
    if set(tensors) != set(reference):
        missing, extra = sorted(set(reference) - set(tensors)), sorted(set(tensors) - set(reference))
        raise BadUpdate(f"model tensors differ: missing {missing}, unexpected {extra}")
    for name, ref in reference.items():
        got = tensors[name]
        if got.dtype != torch.float32:
            raise BadUpdate(f"tensor {name}: dtype {got.dtype}, expected float32")
        if tuple(got.shape) != tuple(ref.shape):
            raise BadUpdate(f"tensor {name}: shape {tuple(got.shape)}, expected {tuple(ref.shape)}")
        if not torch.isfinite(got).all():
            raise BadUpdate(f"tensor {name}: contains NaN or infinity")
    return tensors


def flatten(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """One float64 vector in sorted-name order: what strategies and masks work on."""
    return torch.cat([tensors[k].detach().reshape(-1).to(torch.float64) for k in sorted(tensors)])


def unflatten(vector: torch.Tensor, reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for name in sorted(reference):
        ref = reference[name]
        out[name] = vector[offset:offset + ref.numel()].reshape(ref.shape).to(torch.float32).clone()
        offset += ref.numel()
    assert offset == vector.numel(), "vector length must match the model"
    return out


def encode_u64(values: np.ndarray) -> bytes:
    return values.astype("<u8", copy=False).tobytes()


def decode_u64(data: bytes, length: int) -> np.ndarray:
    if len(data) != 8 * length:
        raise BadUpdate(f"masked vector has {len(data)} bytes, expected {8 * length}")
    return np.frombuffer(data, dtype="<u8").astype(np.uint64)


def check_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """A client's metrics, bounded: few, short names, finite; accuracies in [0, 1], losses >= 0."""
    if len(metrics) > MAX_METRICS:
        raise BadUpdate(f"{len(metrics)} metrics, at most {MAX_METRICS} are accepted")
    clean = {}
    for key, value in metrics.items():
        if len(key) > MAX_METRIC_NAME:
            raise BadUpdate(f"metric name of {len(key)} characters, at most {MAX_METRIC_NAME} are accepted")
        if not math.isfinite(value) or abs(value) > MAX_METRIC_ABS:
            raise BadUpdate(f"metric {key} = {value} is not finite or above {MAX_METRIC_ABS:g} in size")
        if key.endswith("accuracy") and not 0.0 <= value <= 1.0:
            raise BadUpdate(f"metric {key} = {value} is outside [0, 1]: an accuracy is a share of samples")
        if "loss" in key and value < 0.0:
            raise BadUpdate(f"metric {key} = {value} is negative; losses are >= 0")
        clean[key] = float(value)
    return clean
