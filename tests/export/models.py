"""Models for the export tests, named by `model.factory` in their run configs."""

from __future__ import annotations

import torch
from torch import nn

from shoal.data.spec import DataSpec


class Branchy(nn.Module):
    """Takes a different path depending on its input's values: no static graph exists."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, 8)
        self.head = nn.Linear(8, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        if h.sum() > 0:
            h = h * 2
        return self.head(h)


def branchy(spec: DataSpec) -> nn.Module:
    return Branchy(spec.vocab_size)


def tiny_gpt2(spec: DataSpec) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(vocab_size=spec.vocab_size, n_positions=spec.seq_len, n_embd=32, n_layer=2,
                                      n_head=2))
