"""A model.factory whose embedding table is smaller than the data's vocabulary: one line naming
the table and the fix at the first batch, not torch's IndexError from inside the model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shoal.config import ConfigError, load
from shoal.data.spec import DataSpec
from shoal.models import build_model

TOKENS = DataSpec(kind="tokens", vocab_size=256, seq_len=16)


class WithPositions(nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab, 8), nn.Embedding(16, 8)  # positions: 16 < 256 rows
        self.head = nn.Linear(8, 256)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.tokens(ids) + self.positions(torch.arange(ids.shape[1])))


def too_small(spec: DataSpec) -> nn.Module:
    return WithPositions(100)  # a hard-coded vocabulary, not spec.vocab_size


def right(spec: DataSpec) -> nn.Module:
    return WithPositions(spec.vocab_size)


def test_a_table_smaller_than_the_vocabulary_is_one_line():
    model = build_model(load(None, [f"model.factory={__name__}:too_small"]).model, TOKENS)
    with pytest.raises(ConfigError) as err:
        model(torch.full((2, 16), 255))
    message = str(err.value)
    assert "\n" not in message and "tokens" in message and "100 rows" in message and "spec.vocab_size" in message


def test_a_table_that_fits_checks_once_and_trains():
    model = build_model(load(None, [f"model.factory={__name__}:right"]).model, TOKENS)
    model(torch.full((2, 16), 255)).sum().backward()
    assert not model.tokens._forward_pre_hooks and not model.positions._forward_pre_hooks  # checked once
