"""Gradient compression for data-parallel training, as DDP communication hooks.

Each hook is registered with `ddp.register_comm_hook(state, hook)` and replaces
DDP's fp32 all-reduce of one gradient bucket:

- `fp16`: torch's `fp16_compress_hook` (half the bytes).
- `bf16`: the same arithmetic in bfloat16. torch's `bf16_compress_hook` refuses
  Gloo by a check on the hook's name, so Shoal carries its own.
- `int8` / `int4`: blockwise absmax quantisation with error feedback
  (Seide et al. 2014, "1-bit SGD"; Karimireddy et al. 2019, arXiv 1901.09847):
  the part of the gradient lost to rounding is added to the next step's
  gradient, so nothing is dropped for good. int8 pseudo-gradients are what
  INTELLECT-1 (arXiv 2412.01152) sends; 4-bit is Streaming DiLoCo's
  (arXiv 2501.18512).
- `powersgd`: torch's `powerSGD_hook`, low-rank gradients with error feedback
  (Vogels et al. 2019, arXiv 1905.13727). Needs numpy.

Quantised tensors cannot be summed on the wire without overflowing, so
`quantized_all_reduce` all-gathers every rank's payload (codes and scales in
one uint8 tensor) and each rank dequantises and averages them in the same
order, which leaves every replica with bit-identical results. Bytes sent per
rank are (world - 1) * n * bits / 8 against ~2 * n * 4 for a ring all-reduce
in fp32: int8 wins up to 8 ranks, int4 up to 16.
"""

# No `from __future__ import annotations`: DDP checks the hooks' annotations at run time.
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist

__all__ = [
    "BLOCK", "QuantizedState", "bf16_hook", "dequantize", "hook_for", "int4_hook", "int8_hook",
    "quantize", "quantized_all_reduce", "quantized_reduce_scatter",
]

BLOCK = 256  # elements that share one scale: small enough that one outlier spoils few values
_QMAX = {8: 127, 4: 7}  # symmetric ranges, so zero stays exactly zero

Hook = Callable[[Any, dist.GradBucket], torch.futures.Future[torch.Tensor]]


def quantize(tensor: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax quantisation of a tensor into `bits`-bit signed codes.

    Returns (codes, scales): codes as uint8 (int4 packs two values per byte),
    scales as one fp32 per BLOCK elements. Round to nearest: the error is left
    to error feedback rather than hidden in noise.
    """
    qmax = _QMAX[bits]
    flat = tensor.detach().reshape(-1).float()
    padded = torch.nn.functional.pad(flat, (0, (-flat.numel()) % BLOCK)).view(-1, BLOCK)
    scales = padded.abs().amax(dim=1).div_(qmax)
    # An all-zero block keeps scale 0 on the wire; divide by 1 instead of 0.
    codes = torch.round(padded / torch.where(scales > 0, scales, 1.0).unsqueeze(1)).clamp_(-qmax, qmax)
    codes = (codes.to(torch.int16) + qmax).to(torch.uint8).view(-1)  # offset so codes are unsigned
    if bits == 4:
        codes = codes[0::2] | (codes[1::2] << 4)
    return codes, scales


def dequantize(codes: torch.Tensor, scales: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of `quantize`: the fp32 tensor (flat, `numel` values) the codes stand for."""
    qmax = _QMAX[bits]
    if bits == 4:
        codes = torch.stack((codes & 0x0F, codes >> 4), dim=1).view(-1)
    values = (codes.to(torch.int16) - qmax).float().view(-1, BLOCK) * scales.unsqueeze(1)
    return values.view(-1)[:numel]


def quantized_all_reduce(tensor: torch.Tensor, bits: int, group: dist.ProcessGroup | None = None,
                         *, error: torch.Tensor | None = None) -> torch.futures.Future[torch.Tensor]:
    """Average `tensor` over `group` with `bits`-bit codes on the wire; asynchronous.

    The returned future holds the average (flat fp32, the same on every rank);
    `tensor` itself is not changed. With `error` (a flat fp32 buffer, error
    feedback), `error` is added before quantising and then overwritten with what
    rounding lost this time. Built on `all_gather_single`, so it runs on Gloo
    and NCCL alike.
    """
    group = group or dist.group.WORLD
    world = dist.get_world_size(group)
    numel = tensor.numel()
    flat = tensor.detach().reshape(-1).float()
    if error is not None:
        flat = flat + error
    codes, scales = quantize(flat, bits)
    if error is not None:
        error.copy_(flat - dequantize(codes, scales, bits, numel))
    payload = torch.cat((codes, scales.view(torch.uint8)))  # one message per rank, not two
    gathered = torch.empty(world * payload.numel(), dtype=torch.uint8, device=payload.device)
    if isinstance(group, dist.ProcessGroup):
        work = dist.all_gather_single(gathered, payload, group=group, async_op=True)
    else:  # a Gloo backend used directly: the fault-tolerant generations (shoal/fault/elastic.py)
        work = group.allgather([list(gathered.view(world, -1).unbind())], [payload])
    n_codes = codes.numel()

    def average(_: torch.futures.Future) -> torch.Tensor:
        total = torch.zeros(numel, dtype=torch.float32, device=payload.device)
        for row in gathered.view(world, -1):  # fixed rank order: every replica sums identically
            total += dequantize(row[:n_codes], row[n_codes:].view(torch.float32), bits, numel)
        return total.div_(world)

    return work.get_future().then(average)


def quantized_reduce_scatter(tensor: torch.Tensor, bits: int,
                             group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Average `tensor` over `group` with `bits`-bit codes on the wire, in half the bytes of
    `quantized_all_reduce` at 4 ranks; blocking.

    The all-gather above sends (world - 1) * n codes per rank. Here each rank owns 1/world of
    the values: an all-to-all sends every rank its part of everyone's codes, the owner averages
    them (in rank order) and quantises the average again, and an all-gather hands the averaged
    parts round: 2 * (world - 1) / world * n codes per rank, at the cost of a second rounding.
    Every rank decodes the same gathered codes, so the result is bit-identical on all of them.
    """
    group = group or dist.group.WORLD
    world = dist.get_world_size(group)
    numel = tensor.numel()
    part = -(-numel // (world * BLOCK)) * BLOCK  # values each rank owns: whole blocks
    flat = torch.nn.functional.pad(tensor.detach().reshape(-1).float(), (0, world * part - numel))
    codes, scales = quantize(flat, bits)
    # Row r: the codes and scales of rank r's part, one message per destination.
    outgoing = torch.cat((codes.view(world, -1), scales.view(world, -1).view(torch.uint8)), dim=1)
    n_codes = codes.numel() // world
    incoming = torch.empty_like(outgoing)
    dist.all_to_all_single(incoming, outgoing, group=group)
    mine = torch.zeros(part, dtype=torch.float32, device=flat.device)
    for row in incoming:  # fixed rank order
        mine += dequantize(row[:n_codes], row[n_codes:].view(torch.float32), bits, part)
    codes, scales = quantize(mine.div_(world), bits)
    gathered = torch.empty(world * outgoing.shape[1], dtype=torch.uint8, device=flat.device)
    dist.all_gather_single(gathered, torch.cat((codes, scales.view(torch.uint8))), group=group)
    average = torch.cat([dequantize(row[:n_codes], row[n_codes:].view(torch.float32), bits, part)
                         for row in gathered.view(world, -1)])
    return average[:numel]


@dataclass
class QuantizedState:
    """State of the int8/int4 hooks: the group and each bucket's carried-over error."""

    group: dist.ProcessGroup | None = None
    bits: int = 8
    error_feedback: bool = True
    errors: dict[int, torch.Tensor] = field(default_factory=dict)


def _quantized_hook(state: QuantizedState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    buffer = bucket.buffer()
    error = None
    if state.error_feedback:
        error = state.errors.get(bucket.index())
        # DDP rebuilds its buckets after the first step; an error of another size is stale.
        if error is None or error.numel() != buffer.numel():
            error = state.errors[bucket.index()] = torch.zeros(buffer.numel(), device=buffer.device)
    fut = quantized_all_reduce(buffer, state.bits, state.group, error=error)

    def write_back(f: torch.futures.Future[torch.Tensor]) -> torch.Tensor:
        buffer.copy_(f.value().view_as(buffer))
        return buffer

    return fut.then(write_back)


def int8_hook(state: QuantizedState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: int8 gradients with error feedback (`state.bits` must be 8)."""
    assert state.bits == 8
    return _quantized_hook(state, bucket)


def int4_hook(state: QuantizedState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: int4 gradients, two per byte, with error feedback (`state.bits` must be 4)."""
    assert state.bits == 4
    return _quantized_hook(state, bucket)


def bf16_hook(group: dist.ProcessGroup | None, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: all-reduce the bucket in bfloat16 (works on Gloo, unlike torch's)."""
    group = group or dist.group.WORLD
    buffer = bucket.buffer()
    # Divide before the sum: bf16 has fp32's range, but keeping values small costs nothing.
    compressed = buffer.to(torch.bfloat16).div_(dist.get_world_size(group))
    work = dist.all_reduce(compressed, group=group, async_op=True)

    def decompress(_: torch.futures.Future) -> torch.Tensor:
        buffer.copy_(compressed)
        return buffer

    return work.get_future().then(decompress)


def hook_for(method: str, group: dist.ProcessGroup | None = None, *, powersgd_rank: int = 4,
             powersgd_warmup: int = 10, error_feedback: bool = True) -> tuple[Any, Hook] | None:
    """The (state, hook) pair for a compression method; None means DDP's own all-reduce."""
    if method == "allreduce":
        return None
    if method == "fp16":
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook
        return group, fp16_compress_hook
    if method == "bf16":
        return group, bf16_hook
    if method in ("int8", "int4"):
        bits = int(method[3:])
        return QuantizedState(group=group, bits=bits, error_feedback=error_feedback), (
            int8_hook if bits == 8 else int4_hook)
    if method == "powersgd":
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook
        state = powerSGD_hook.PowerSGDState(
            process_group=group, matrix_approximation_rank=powersgd_rank,
            start_powerSGD_iter=max(2, powersgd_warmup), use_error_feedback=error_feedback)
        return state, powerSGD_hook.powerSGD_hook
    raise ValueError(f"unknown compression method {method!r}: expected allreduce, fp16, bf16, int8, int4, powersgd")
