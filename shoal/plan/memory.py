"""Per-rank memory of a parallel layout, estimated without starting any worker.

The model is built on the meta device (shapes, no storage), so the parameter count is
exact for any size; each parameter is then assigned to the pipeline stage and cut by the
tensor-parallel and FSDP splits that shoal/parallel applies to it. Activations use a
count of the tensors autograd saves per transformer block (see `_gpt_activations`),
checked against measured values in tests/plan.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from shoal.config import Config
from shoal.runtime.mesh import ParallelDims

FP32 = 4


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on the busiest rank of a layout."""

    params: int
    grads: int
    optimizer: int
    activations: int
    buffers: int
    """Transient copies: DDP's gradient buckets, FSDP's gathered block, recomputed block."""

    @property
    def state(self) -> int:
        """Parameters, gradients and optimizer state: what sharding divides."""
        return self.params + self.grads + self.optimizer

    @property
    def total(self) -> int:
        return self.state + self.activations + self.buffers


def data_spec(cfg: Config):
    """The DataSpec the model will be built for, without loading the data."""
    from shoal.data.spec import DataSpec
    source = cfg.data.source
    if source in ("stdlib", "text"):
        from shoal.data.datasets import VOCAB_SIZE
        return DataSpec(kind="tokens", vocab_size=VOCAB_SIZE, seq_len=cfg.data.seq_len)
    if source == "synthetic":
        return DataSpec(kind="classes", in_features=cfg.data.features, num_classes=cfg.data.classes)
    if source == "clicks":
        from shoal.data.clicks import DENSE_FEATURES, TABLE_SIZES, ClickSpec
        return ClickSpec(kind="classes", in_features=DENSE_FEATURES + len(TABLE_SIZES), num_classes=2)
    import numpy as np  # npy: only the headers are read (memory-mapped)
    x_path, y_path = (cfg.data.path.split(",", 1) if "," in cfg.data.path
                      else (f"{cfg.data.path}/x.npy", f"{cfg.data.path}/y.npy"))
    x, y = np.load(x_path, mmap_mode="r"), np.load(y_path, mmap_mode="r")
    if y.dtype.kind == "f":
        return DataSpec(kind="regression", in_features=x.shape[1], num_classes=1 if y.ndim == 1 else y.shape[1])
    return DataSpec(kind="classes", in_features=x.shape[1], num_classes=int(y.max()) + 1)


def meta_model(cfg: Config) -> nn.Module:
    """The configured model with shapes only: costs no memory however large it is."""
    from shoal.models import build_model
    with torch.device("meta"):
        return build_model(cfg.model, data_spec(cfg))


_GPT_COLWISE = re.compile(r"layers\.\d+\.(attention\.w[qkv]|feed_forward\.w1)\.(weight|bias)$|output\.weight$")
_GPT_ROWWISE = re.compile(r"layers\.\d+\.(attention\.wo|feed_forward\.w2)\.weight$")


def _tp_split_dim(model: nn.Module, name: str) -> int | None:
    """Which dimension of parameter `name` shoal/parallel/tensor.py splits over tp (None: whole)."""
    kind = type(model).__name__
    if kind == "GPT":
        return 0 if _GPT_COLWISE.match(name) else 1 if _GPT_ROWWISE.match(name) else None
    if kind == "MLP":
        linears = [n for n, m in model.named_children() if isinstance(m, nn.Linear)]
        index = linears.index(name.split(".")[0])
        if index % 2:
            return 1 if name.endswith("weight") else None
        return 0
    if kind == "DLRM" and name.startswith("embeddings."):
        return 0  # row- or column-wise, the table is cut in tp pieces either way; dim 0 approximates both
    return None


def _stage_of(name: str, n_layers: int, n_stages: int) -> int:
    from shoal.parallel.stages import stage_layers
    if name.startswith("layers."):
        layer = int(name.split(".")[1])
        return next(s for s, r in enumerate(stage_layers(n_layers, n_stages)) if layer in r)
    return n_stages - 1 if name.startswith(("norm.", "output.")) else 0


def estimate_memory(cfg: Config, dims: ParallelDims, model: nn.Module | None = None,
                    pp_rank: int | None = None) -> MemoryEstimate:
    """Per-rank memory of training `cfg`'s model under `dims`, for the busiest rank (the one
    with the most bytes in all), or for the ranks of pipeline stage group `pp_rank`."""
    from shoal.parallel.stages import STAGES_PER_RANK
    model = model if model is not None else meta_model(cfg)
    per_rank = STAGES_PER_RANK[cfg.parallel.pp_schedule] if dims.pp > 1 else 1
    n_stages = dims.pp * per_rank
    n_layers = len(model.layers) if hasattr(model, "layers") else 0
    fsdp = dims.dp_shard > 1 or (dims.dp > 1 and (dims.tp > 1 or dims.pp > 1))
    ranks = [0] * dims.pp
    for name, p in model.named_parameters():
        shape = list(p.shape)
        split = _tp_split_dim(model, name) if dims.tp > 1 else None
        if split is not None and split < len(shape):
            shape[split] = math.ceil(shape[split] / dims.tp)
        if dims.dp_shard > 1:  # FSDP pads dim 0 to a multiple of the shard count
            shape[0] = math.ceil(shape[0] / dims.dp_shard)
        ranks[_stage_of(name, n_layers, n_stages) % dims.pp if n_layers else 0] += math.prod(shape)
    opt_bytes = {"adamw": 2 * FP32, "sgd": FP32 if cfg.train.momentum else 0}[cfg.train.optimizer]
    # the busiest pipeline rank: stage 0 holds the most micro-batches in flight, the last the head
    totals = [n * (2 * FP32 + opt_bytes) + _activations(cfg, dims, model, r) for r, n in enumerate(ranks)]
    busiest = totals.index(max(totals)) if pp_rank is None else pp_rank
    numel, acts = ranks[busiest], _activations(cfg, dims, model, busiest)
    buffers = 0
    if dims.dp > 1 and not fsdp:
        buffers = numel * FP32  # DDP's gradient buckets are a second copy of the gradients
    elif dims.dp_shard > 1 and n_layers:
        block = sum(p.numel() for p in model.layers["0"].parameters()) // dims.tp
        buffers = 2 * block * FP32  # one block gathered whole, with its whole gradient
    return MemoryEstimate(params=numel * FP32, grads=numel * FP32, optimizer=numel * opt_bytes,
                          activations=acts, buffers=buffers)


def _activations(cfg: Config, dims: ParallelDims, model: nn.Module, pp_rank: int) -> int:
    batch = cfg.train.batch_size // max(1, dims.dp) // cfg.train.grad_accum
    if type(model).__name__ != "GPT":
        # inputs and outputs of every Linear / Embedding, per sample
        widths = sum(m.in_features + m.out_features for m in model.modules() if isinstance(m, nn.Linear))
        widths += sum(m.embedding_dim for m in model.modules() if isinstance(m, nn.Embedding))
        return batch * widths * FP32
    return _gpt_activations(cfg, dims, model, batch, pp_rank)


def _gpt_activations(cfg: Config, dims: ParallelDims, model: nn.Module, batch: int, pp_rank: int) -> int:
    from shoal.parallel.stages import STAGES_PER_RANK, stage_ids, stage_layers
    args, tp = model.args, dims.tp
    s, d, v = args.seq_len, args.dim, args.vocab_size
    # Saved for backward per block, in units of (tokens x dim): the norm inputs and outputs
    # (2+2), q, k, v and the attention output (4), the projection input (1), the MLP's
    # hidden before and after GELU (4+4): 17. Under tp with sequence parallelism the
    # norms hold 1/tp of the tokens and the two gathered norm outputs are whole: 2 + 15/tp.
    per_block = 17.0 if tp == 1 else 2 + 15 / tp
    ac = cfg.parallel.activation_checkpointing
    # Head: the final norm's input and output, and log-softmax over the vocabulary.
    head = (2.0 if tp == 1 else 1 + 1 / tp) * d + v
    if dims.pp == 1:
        tokens = batch * s
        blocks = len(model.layers)
        kept = {"none": per_block * blocks, "full": blocks / tp + per_block,
                "selective": (2 + 9 / tp) * blocks + per_block}[ac]
        return int(tokens * (kept * d + head) * FP32)
    schedule = cfg.parallel.pp_schedule
    m = cfg.parallel.pp_microbatches
    micro = batch // m
    n_stages = dims.pp * STAGES_PER_RANK[schedule]
    ranges = stage_layers(len(model.layers), n_stages)
    total = 0.0
    for sid in stage_ids(pp_rank, dims.pp, schedule):
        # micro-batches whose activations a stage holds at once: all of them under GPipe,
        # at most the stages after it (+1) under 1F1B
        in_flight = m if schedule == "gpipe" else min(m, n_stages - sid)
        blocks = len(ranges[sid])
        kept = {"none": per_block * blocks, "full": blocks / tp + per_block,
                "selective": (2 + 9 / tp) * blocks + per_block}[ac]
        total += in_flight * micro * s * (kept * d + (head if sid == n_stages - 1 else 0))
    return int(total * FP32)
