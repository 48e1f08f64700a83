"""What a model needs to know about its data, without holding the data."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class DataSpec:
    kind: str
    """'tokens' (next-token prediction), 'classes' (integer labels) or 'regression' (float targets)."""
    vocab_size: int = 0
    """Token ids run from 0 to vocab_size - 1 (kind 'tokens')."""
    seq_len: int = 0
    """Tokens per sample (kind 'tokens')."""
    in_features: int = 0
    """Features per sample (kinds 'classes' and 'regression'); for images, channels x height x width."""
    num_classes: int = 0
    """Output width: classes for 'classes', targets for 'regression'."""
    input_shape: tuple[int, ...] = ()
    """Shape of one sample's input when it is not a flat vector (images: (3, H, W)). Empty means flat."""
