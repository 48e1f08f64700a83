"""A small decoder-only transformer (GPT-2 shaped: pre-norm blocks, learned positions).

Written for the parallel techniques: layers live in a `ModuleDict` keyed by index so a
pipeline stage can drop the ones it does not own, the embeddings, final norm and head may
be `None` on a stage, and attention derives its local head count from `wq`'s output so
tensor parallelism can split heads across ranks without touching this file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GPTArgs:
    vocab_size: int
    seq_len: int
    dim: int
    n_layers: int
    n_heads: int
    dropout: float = 0.0


FLAVOURS: dict[str, dict[str, int]] = {
    "debug": {"dim": 64, "n_layers": 2, "n_heads": 4},
    "small": {"dim": 256, "n_layers": 4, "n_heads": 8},
    "medium": {"dim": 512, "n_layers": 8, "n_heads": 8},
    "125m": {"dim": 768, "n_layers": 12, "n_heads": 12},
}


class Attention(nn.Module):
    def __init__(self, args: GPTArgs):
        super().__init__()
        self.head_dim = args.dim // args.n_heads
        self.wq = nn.Linear(args.dim, args.dim)
        self.wk = nn.Linear(args.dim, args.dim)
        self.wv = nn.Linear(args.dim, args.dim)
        self.wo = nn.Linear(args.dim, args.dim)
        self.dropout = args.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds only its share of the heads
        q, k, v = (w(x).view(batch, seq, -1, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))


class FeedForward(nn.Module):
    def __init__(self, args: GPTArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, 4 * args.dim)
        self.w2 = nn.Linear(4 * args.dim, args.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x)))


class Block(nn.Module):
    def __init__(self, args: GPTArgs):
        super().__init__()
        self.attention_norm = nn.LayerNorm(args.dim)
        self.attention = Attention(args)
        self.ffn_norm = nn.LayerNorm(args.dim)
        self.feed_forward = FeedForward(args)
        self.drop = nn.Dropout(args.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attention(self.attention_norm(x)))
        return x + self.drop(self.feed_forward(self.ffn_norm(x)))


class GPT(nn.Module):
    def __init__(self, args: GPTArgs):
        super().__init__()
        if args.dim % args.n_heads:
            raise ValueError(f"model.dim = {args.dim} must be divisible by model.n_heads = {args.n_heads}")
        self.args = args
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(args.vocab_size, args.dim)
        self.pos_embeddings: nn.Embedding | None = nn.Embedding(args.seq_len, args.dim)
        self.layers = nn.ModuleDict({str(i): Block(args) for i in range(args.n_layers)})
        self.norm: nn.LayerNorm | None = nn.LayerNorm(args.dim)
        self.output: nn.Linear | None = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.apply(_init_weights)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = tokens
        if self.tok_embeddings is not None:
            positions = torch.arange(tokens.shape[1], device=tokens.device)
            h = self.tok_embeddings(tokens) + self.pos_embeddings(positions)
        for layer in self.layers.values():
            h = layer(h)
        if self.norm is not None:
            h = self.norm(h)
        return self.output(h) if self.output is not None else h


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def build_gpt(vocab_size: int, seq_len: int, flavour: str = "debug", *, dim: int = 0, n_layers: int = 0,
              n_heads: int = 0, dropout: float = 0.0) -> GPT:
    preset = FLAVOURS[flavour]
    return GPT(GPTArgs(vocab_size=vocab_size, seq_len=seq_len, dim=dim or preset["dim"],
                       n_layers=n_layers or preset["n_layers"], n_heads=n_heads or preset["n_heads"],
                       dropout=dropout))
