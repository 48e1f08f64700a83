"""Outer-gradient encodings: how a DiLoCo pseudo-gradient is packed for the wire, and the one
collective that averages encoded pseudo-gradients over the replicas.

An encoding turns a flat fp32 pseudo-gradient into one uint8 payload whose size depends only
on the number of values (so every replica's payload has the same length), and a payload back
into fp32 values. Each encoding is one file: `sparse.py` (top-k + low-bit with error feedback,
SparseLoCo), `fp4.py` (4-bit floats, Streaming DiLoCo); `QuantizedEncoding` here wraps
shoal/sync/compress.py's int8/int4 codes for transports that carry one payload per replica (the
cross-site plane). Inside a c10d group DiLoCo still sends int8/int4 by compress.py's own
collectives (all-to-all + all-gather at more than 2 replicas); fp16/bf16 are plain casts.

Encoded payloads cannot be summed on the wire, so `encoded_all_reduce` all-gathers every
replica's payload and each replica decodes and averages them in rank order: every replica
ends with bit-identical values. That gather is the only place an encoded outer gradient
crosses between replicas (DiLoCo's `reduce_outer_gradient` calls it).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist

from shoal.sync.compress import BLOCK, dequantize, quantize

__all__ = ["ENCODINGS", "QUANTIZED", "OuterEncoding", "QuantizedEncoding", "decode_average", "encoded_all_reduce",
           "make_encoding"]

ENCODINGS = ("fp4", "topk")
"""sync.compression values that are an `OuterEncoding` (one payload per replica, gathered)."""
QUANTIZED = ("int8", "int4")
"""sync.compression values with an `OuterEncoding` as well as compress.py's collectives."""


class OuterEncoding(Protocol):
    """One fragment's wire format (it may keep state, such as the error-feedback residual)."""

    numel: int

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        """The uint8 payload for flat fp32 `values` (updates any error feedback)."""

    def decode(self, payload: torch.Tensor) -> torch.Tensor:
        """The flat fp32 values (`numel` of them) a payload stands for."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What a resumed run needs (the residual of error feedback), tensors only."""

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore `state_dict()`."""


class QuantizedEncoding:
    """int8/int4 codes with one fp32 scale per BLOCK values (shoal/sync/compress.py), as one payload."""

    def __init__(self, numel: int, bits: int):
        self.numel, self.bits = numel, bits
        self.n_codes = -(-numel // BLOCK) * BLOCK * bits // 8

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        codes, scales = quantize(values, self.bits)
        return torch.cat((codes, scales.view(torch.uint8)))

    def decode(self, payload: torch.Tensor) -> torch.Tensor:
        scales = payload[self.n_codes:].clone().view(torch.float32)
        return dequantize(payload[:self.n_codes], scales, self.bits, self.numel)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        return None


def make_encoding(name: str, numel: int, *, topk_fraction: float = 0.02, topk_bits: int = 2) -> OuterEncoding:
    """The encoding `name` (one of ENCODINGS or QUANTIZED) for a fragment of `numel` values."""
    if name in QUANTIZED:
        return QuantizedEncoding(numel, int(name[3:]))
    if name == "fp4":
        from shoal.sync.fp4 import FP4Encoding
        return FP4Encoding(numel)
    if name == "topk":
        from shoal.sync.sparse import TopKEncoding
        return TopKEncoding(numel, fraction=topk_fraction, bits=topk_bits)
    raise ValueError(f"compression = {name!r} is not an outer-gradient encoding "
                     f"({', '.join(QUANTIZED + ENCODINGS)})")


def decode_average(payloads: torch.Tensor, encoding: OuterEncoding) -> torch.Tensor:
    """The mean of the values that the rows of `payloads` (one per replica) stand for, in row order."""
    total = torch.zeros(encoding.numel, dtype=torch.float32, device=payloads.device)
    for row in payloads:  # fixed rank order: every replica sums identically
        total += encoding.decode(row)
    return total.div_(payloads.shape[0])


def encoded_all_reduce(payload: torch.Tensor, encoding: OuterEncoding,
                       group: dist.ProcessGroup | None = None) -> torch.futures.Future[torch.Tensor]:
    """Average over `group` the values that each replica's `payload` stands for; asynchronous.

    One all-gather of (replicas - 1) payloads per replica; the future holds the flat fp32 mean,
    the same on every replica.
    """
    group = group or dist.group.WORLD
    world = dist.get_world_size(group)
    gathered = torch.empty(world * payload.numel(), dtype=torch.uint8, device=payload.device)
    work = dist.all_gather_single(gathered, payload, group=group, async_op=True)
    return work.get_future().then(lambda _: decode_average(gathered.view(world, -1), encoding))
