"""FP4 outer gradients: 4-bit floats (1 sign, 3 exponent, 0 mantissa bits) with one scale per block.

Streaming DiLoCo (Douillard et al. 2025, arXiv 2501.18512) sends its outer gradients in 4-bit
floating point (E3M0) and finds no loss against fp32 and no need for error feedback, so none
is kept here. A float code suits pseudo-gradients better than int4's uniform levels: their
values spread over orders of magnitude, and E3M0 keeps one significant bit of each from the
block's largest down to 1/64 of it.

Each block of BLOCK values (shoal/sync/compress.py's) shares its largest magnitude s as an
fp32 scale; a value v becomes sign(v) * 2**e * s with e in -6..0, or 0 below s / 128 (nearest
level in linear terms). Two codes per byte: 0.5 + 4 / BLOCK bytes per value, 7.9x fewer than
fp32.
"""

from __future__ import annotations

import torch

from shoal.sync.compress import BLOCK

__all__ = ["FP4Encoding", "dequantize_fp4", "quantize_fp4"]

_MIN_EXPONENT = -6  # magnitude codes 1..7 stand for 2**-6 .. 2**0 of the block's scale; 0 for zero


def quantize_fp4(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes packed two per byte, one fp32 scale per BLOCK) for flat fp32 `values`."""
    flat = values.detach().reshape(-1).float()
    blocks = torch.nn.functional.pad(flat, (0, (-flat.numel()) % BLOCK)).view(-1, BLOCK)
    scales = blocks.abs().amax(dim=1, keepdim=True)
    ratio = blocks.abs() / torch.where(scales > 0, scales, torch.ones_like(scales))
    below = torch.floor(torch.log2(ratio.clamp(min=2.0 ** (_MIN_EXPONENT - 2))))
    # Round to the nearer of 2**below and 2**(below + 1): their midpoint is 1.5 * 2**below.
    exponent = (below + (ratio >= 1.5 * torch.exp2(below)).float()).clamp(_MIN_EXPONENT - 1, 0)
    magnitude = (exponent - _MIN_EXPONENT + 1).clamp(min=1)
    magnitude = torch.where(ratio < 2.0 ** (_MIN_EXPONENT - 1), torch.zeros_like(magnitude), magnitude)
    codes = (magnitude + 8 * (blocks < 0).float()).to(torch.uint8).view(-1)
    return codes[0::2] | (codes[1::2] << 4), scales.view(-1)


def dequantize_fp4(packed: torch.Tensor, scales: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of `quantize_fp4`: the flat fp32 values (`numel` of them)."""
    codes = torch.stack((packed & 0x0F, packed >> 4), dim=1).view(-1, BLOCK)
    magnitude = (codes & 0x07).float()
    sign = 1.0 - 2.0 * (codes >> 3).float()
    value = torch.where(magnitude > 0, torch.exp2(magnitude + _MIN_EXPONENT - 1), torch.zeros_like(magnitude))
    return (sign * value * scales.unsqueeze(1)).view(-1)[:numel]


class FP4Encoding:
    """FP4 (E3M0) encoding of one fragment's pseudo-gradient; stateless (no error feedback)."""

    def __init__(self, numel: int):
        self.numel = numel
        self.blocks = -(-numel // BLOCK)

    @property
    def payload_bytes(self) -> int:
        """Bytes one replica sends per sync of this fragment."""
        return self.blocks * BLOCK // 2 + self.blocks * 4

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        packed, scales = quantize_fp4(values)
        return torch.cat((packed, scales.view(torch.uint8)))

    def decode(self, payload: torch.Tensor) -> torch.Tensor:
        n_packed = self.blocks * BLOCK // 2
        return dequantize_fp4(payload[:n_packed], payload[n_packed:].clone().view(torch.float32), self.numel)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        return None
