"""The outer-gradient encodings (top-k + low-bit with error feedback, FP4) and their config checks."""

from __future__ import annotations

import pytest
import torch

from shoal.config import ConfigError, load
from shoal.sync.compress import BLOCK
from shoal.sync.encoding import decode_average, encoded_all_reduce, make_encoding
from shoal.sync.fp4 import FP4Encoding
from shoal.sync.sparse import CHUNK, TopKEncoding, pack_codes, unpack_codes


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_codes_pack_and_unpack(bits):
    codes = torch.randint(0, 1 << bits, (64,), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.numel() == 64 * bits // 8
    assert torch.equal(unpack_codes(packed, bits), codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_topk_sends_the_largest_values_within_half_a_level(bits):
    torch.manual_seed(0)
    values = torch.randn(2 * CHUNK + 123)
    encoding = TopKEncoding(values.numel(), fraction=0.05, bits=bits)
    payload = encoding.encode(values)
    assert payload.numel() == encoding.payload_bytes
    sent = encoding.decode(payload)
    kept = sent != 0  # no code stands for zero
    for c in range(encoding.chunks):
        part = slice(c * CHUNK, min((c + 1) * CHUNK, values.numel()))
        chunk, mask = values[part], kept[part]
        assert mask.sum() == min(encoding.k, chunk.numel())  # the short last chunk sends all it has
        if (~mask).any():  # every kept value is at least as large as every value left out of its chunk
            assert chunk[mask].abs().min() >= chunk[~mask].abs().max()
        level = 2 * chunk[mask].abs().max() / ((1 << bits) - 1)
        assert (sent[part][mask] - chunk[mask]).abs().max() <= level / 2 + 1e-6
    assert torch.allclose(sent + encoding.residual, values, atol=1e-6)


@pytest.mark.parametrize("fraction,bits", [(0.02, 2), (0.01, 4), (1.0, 8)])
def test_error_feedback_keeps_the_sum_over_steps(fraction, bits):
    # Nothing is lost for good: what was sent over all steps plus what waits equals all that was given.
    torch.manual_seed(1)
    encoding = TopKEncoding(3 * CHUNK, fraction=fraction, bits=bits)
    given, sent = torch.zeros(3 * CHUNK, dtype=torch.float64), torch.zeros(3 * CHUNK, dtype=torch.float64)
    for _ in range(40):
        values = torch.randn(3 * CHUNK) * torch.rand(1)
        given += values.double()
        sent += encoding.decode(encoding.encode(values)).double()
    assert torch.allclose(sent + encoding.residual.double(), given, atol=1e-4)
    assert encoding.residual.abs().max() > 0 if fraction < 1 else True


def test_topk_payload_is_about_what_the_docs_say():
    encoding = TopKEncoding(1_000_000, fraction=0.02, bits=2)
    # 2 % of the values, each 2 bytes of index + 2 bits, plus a scale per chunk: ~0.05 bytes per value.
    assert 0.045 < encoding.payload_bytes / 1_000_000 < 0.055


def test_fp4_round_trip():
    torch.manual_seed(0)
    values = torch.randn(3 * BLOCK + 5) * torch.logspace(-2, 0, 3 * BLOCK + 5)
    encoding = FP4Encoding(values.numel())
    payload = encoding.encode(values)
    assert payload.numel() == encoding.payload_bytes
    decoded = encoding.decode(payload)
    scale = torch.nn.functional.pad(values, (0, (-values.numel()) % BLOCK)).view(-1, BLOCK).abs().amax(1)
    scale = scale.repeat_interleave(BLOCK)[:values.numel()]
    ratio = values.abs() / scale
    # Within a third of the value where it is in range (neighbouring powers of two), zero far below.
    in_range = ratio >= 2.0 ** -6
    assert ((decoded - values).abs() <= values.abs() / 3 + 1e-7)[in_range].all()
    assert ((decoded - values).abs() <= scale * 2.0 ** -7 + 1e-7)[~in_range].all()
    assert torch.equal(decoded.sign()[decoded != 0], values.sign()[decoded != 0])
    # Powers of two of the block's scale travel exactly.
    exact = torch.tensor([1.0, -0.5, 0.25, 2.0 ** -6, 0.0] + [0.0] * (BLOCK - 5))
    assert torch.equal(FP4Encoding(BLOCK).decode(FP4Encoding(BLOCK).encode(exact)), exact)


@pytest.mark.parametrize("name", ["fp4", "topk"])
def test_gathered_average_on_one_rank_is_the_decoded_payload(single_rank_group, name):
    torch.manual_seed(0)
    values = torch.randn(5000)
    encoding = make_encoding(name, values.numel())
    payload = encoding.encode(values)
    averaged = encoded_all_reduce(payload, encoding, single_rank_group).wait()
    assert torch.equal(averaged, encoding.decode(payload))
    two = torch.stack([payload, payload])
    assert torch.allclose(decode_average(two, encoding), encoding.decode(payload))


@pytest.mark.parametrize("override,field", [
    ("sync.topk_fraction=0", "sync.topk_fraction"), ("sync.topk_fraction=1.5", "sync.topk_fraction"),
    ("sync.topk_fraction=-0.1", "sync.topk_fraction"), ("sync.topk_bits=3", "sync.topk_bits"),
    ("sync.inner_steps=0", "sync.inner_steps"), ("sync.outer_momentum=1.0", "sync.outer_momentum"),
    ("sync.compression=fp5", "sync.compression")])
def test_outer_settings_that_cannot_work_name_their_field(override, field):
    base = ["sync.method=diloco", "parallel.dp_replicate=2", "sync.compression=topk"]
    with pytest.raises(ConfigError, match=f"^{field} ") as err:
        load(None, base + [override])
    assert "\n" not in str(err.value)


def test_topk_settings_without_topk_are_refused():
    with pytest.raises(ConfigError, match="sync.topk_fraction and sync.topk_bits apply only"):
        load(None, ["sync.method=diloco", "parallel.dp_replicate=2", "sync.topk_bits=4"])


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_encoding_is_compress_codes_in_one_payload(bits):
    from shoal.sync.compress import dequantize, quantize
    values = torch.randn(3 * BLOCK + 7)
    encoding = make_encoding(f"int{bits}", values.numel())
    codes, scales = quantize(values, bits)
    assert torch.equal(encoding.decode(encoding.encode(values)), dequantize(codes, scales, bits, values.numel()))
