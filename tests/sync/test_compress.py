"""Unit tests of the quantisers and the hook factory (one process)."""

from __future__ import annotations

import pytest
import torch

from shoal.config import ConfigError, SyncConfig, load
from shoal.sync import comm_hook_for, outer_sync_for
from shoal.sync.compress import BLOCK, QuantizedState, bf16_hook, dequantize, quantize, quantized_all_reduce


@pytest.mark.parametrize("bits", [8, 4])
def test_round_trip_error_is_half_a_step(bits):
    torch.manual_seed(0)
    x = torch.randn(3 * BLOCK + 17) * torch.logspace(-3, 1, 3 * BLOCK + 17)
    codes, scales = quantize(x, bits)
    y = dequantize(codes, scales, bits, x.numel())
    qmax = {8: 127, 4: 7}[bits]
    for b in range(scales.numel()):
        block = slice(b * BLOCK, min((b + 1) * BLOCK, x.numel()))
        bound = x[block].abs().max() / qmax / 2 + 1e-6
        assert (x[block] - y[block]).abs().max() <= bound
    assert codes.numel() == (4 * BLOCK) * bits // 8  # int4 packs two codes per byte
    assert codes.dtype == torch.uint8


def test_round_trip_keeps_zeros_and_extremes():
    x = torch.zeros(2 * BLOCK)
    x[3], x[BLOCK + 5] = -2.5, 4.0
    for bits in (8, 4):
        y = dequantize(*quantize(x, bits), bits, x.numel())
        assert y[3] == pytest.approx(-2.5) and y[BLOCK + 5] == pytest.approx(4.0)
        assert torch.count_nonzero(y) == 2


def test_error_feedback_recovers_what_rounding_drops(single_rank_group):
    # 0.3 sits below half an int4 step (scale 1.0 from the 7.0), so it rounds to 0 every time...
    grad = torch.full((BLOCK,), 0.3)
    grad[0] = 7.0
    steps = 20
    plain = sum(quantized_all_reduce(grad, 4).wait() for _ in range(steps)) / steps
    assert plain[1:].abs().max() == 0
    # ...but with error feedback the leftover accumulates and is sent later: the mean is kept.
    error = torch.zeros(BLOCK)
    fed = sum(quantized_all_reduce(grad, 4, error=error).wait() for _ in range(steps)) / steps
    assert fed[1:].mean().item() == pytest.approx(0.3, abs=0.05)
    assert error.abs().max() <= 0.5 + 1e-6  # the carried error stays below one half step


def test_factory_picks_each_hook():
    assert comm_hook_for(SyncConfig(method="allreduce")) is None
    assert comm_hook_for(SyncConfig(method="diloco")) is None
    assert comm_hook_for(SyncConfig(method="bf16"))[1] is bf16_hook
    state, _ = comm_hook_for(SyncConfig(method="int4", error_feedback=False))
    assert isinstance(state, QuantizedState) and state.bits == 4 and not state.error_feedback
    assert comm_hook_for(SyncConfig(method="fp16"))[1].__name__ == "fp16_compress_hook"
    state, hook = comm_hook_for(SyncConfig(method="powersgd", powersgd_rank=2))
    assert hook.__name__ == "powerSGD_hook" and state.matrix_approximation_rank == 2
    assert isinstance(outer_sync_for(SyncConfig(), torch.nn.Linear(2, 2), None, None),
                      type(__import__("contextlib").nullcontext()))


@pytest.mark.parametrize("overrides, field", [
    (["sync.method=gossip"], "sync.method"),
    (["sync.inner_steps=0"], "sync.inner_steps"),
    (["sync.method=diloco", "sync.compression=int2"], "sync.compression"),
    (["sync.compression=int8"], "sync.compression"),
    (["sync.method=diloco", "sync.inner_steps=2", "sync.fragments=4"], "sync.fragments"),
    (["sync.method=diloco", "parallel.dp_replicate=1"], "parallel.dp_replicate"),
    (["sync.method=int8", "parallel.dp_shard=2"], "parallel.dp_shard"),
])
def test_bad_sync_config_names_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load(overrides=overrides)


def test_outer_sync_without_replicas_is_a_clear_error():
    with pytest.raises(ConfigError, match="1 replica"):
        outer_sync_for(SyncConfig(method="diloco"), torch.nn.Linear(2, 2), None, None)
