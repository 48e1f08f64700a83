"""Tensor parallelism (`torch.distributed.tensor.parallel`): each weight matrix split
across the ranks of the "tp" axis, following Shoeybi et al., "Megatron-LM" (2019) — a
column split followed by a row split needs one all-reduce per pair — and, for the norms,
Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models" (2022):
sequence parallelism keeps the activations between blocks split along the sequence.

One plan per model family; a model without one is refused by `check_layout` before any
worker starts. Hugging Face models bring their own plan (`config.base_model_tp_plan`, see
shoal/parallel/hf_tensor.py).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleOutput,
                                               RowwiseParallel,
                                               SequenceParallel, parallelize_module)


def apply_tp(model: nn.Module, mesh: DeviceMesh, *, pipeline_stages: int = 1) -> nn.Module:
    """Split `model`'s weights over the 1-D "tp" `mesh` in place (gpt, mlp, dlrm or Hugging Face).
    `pipeline_stages`: the stages the model is split into afterwards, in all (the gpt's stream
    enters and leaves each stage whole)."""
    from shoal.models.gpt import GPT
    from shoal.models.hf import is_hf
    from shoal.models.mlp import MLP
    if is_hf(model):
        from shoal.parallel.hf_tensor import apply_hf_tp
        return apply_hf_tp(model, mesh)
    if isinstance(model, GPT):
        return _tp_gpt(model, mesh, pipeline_stages)
    if isinstance(model, MLP):
        return _tp_mlp(model, mesh)
    from shoal.models.dlrm import DLRM
    if isinstance(model, DLRM):
        return _tp_dlrm(model, mesh)
    from shoal.config import ConfigError
    raise ConfigError(f"parallel.tp = {mesh.size()}: {type(model).__name__} has no tensor-parallel plan (only "
                      f"gpt, mlp, dlrm and Hugging Face models with config.base_model_tp_plan have one); use "
                      f"parallel.tp = 1 and parallel.dp_shard to shard it")


def _tp_gpt(model: nn.Module, mesh: DeviceMesh, n_stages: int) -> nn.Module:
    # Between blocks the residual stream is split along the sequence (Shard(1)); each block
    # gathers it before attention and the MLP (PrepareModuleInput) and scatters it again
    # after the row-parallel projections, so the norms run on 1/tp of the tokens.
    # The embeddings stay replicated: the learned positions are added to the token
    # embeddings in GPT.forward, which a sequence-sharded embedding output would not fit.
    for name, block in model.layers.items():
        plan = {
            "attention_norm": SequenceParallel(),
            "attention": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
            "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
        }
        parallelize_module(block, mesh, plan)
    # The stream enters each pipeline stage's first block whole (from the embeddings or from
    # the previous stage, which sends full activations) and leaves its last block whole.
    # TP runs before the pipeline split, so the stage boundaries come from the same rule
    # pipeline.py uses.
    from shoal.parallel.stages import stage_layers
    names = list(model.layers.keys())
    for s, layers in enumerate(stage_layers(len(names), n_stages)):
        first, last = model.layers[names[layers[0]]], model.layers[names[layers[-1]]]
        # the residual stream is kept as plain local tensors: adding a DTensor to one fails
        parallelize_module(first, mesh, PrepareModuleInput(input_layouts=(Replicate(),),
                                                           desired_input_layouts=(Shard(1),),
                                                           use_local_output=True))
        if s < n_stages - 1:
            parallelize_module(last, mesh, PrepareModuleOutput(output_layouts=(Shard(1),),
                                                               desired_output_layouts=(Replicate(),)))
    parallelize_module(model, mesh, {
        "norm": SequenceParallel(use_local_output=False),
        # logits gathered whole: the loss then needs no scaling by 1/tp
        "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
    })
    return model


def _tp_mlp(model: nn.Sequential, mesh: DeviceMesh) -> nn.Module:
    # pairs of Linear layers: column split then row split, one all-reduce per pair; an odd
    # last layer (the head) is column split and gathers its output
    linears = [name for name, m in model.named_children() if isinstance(m, nn.Linear)]
    plan: dict[str, object] = {}
    for i, name in enumerate(linears):
        if i % 2:
            plan[name] = RowwiseParallel()
        elif i == len(linears) - 1:
            plan[name] = ColwiseParallel(output_layouts=Replicate())
        else:
            plan[name] = ColwiseParallel()
    return parallelize_module(model, mesh, plan)


def _tp_dlrm(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    # Embedding tables are what outgrows one worker in a recommender; the MLPs are small
    # and stay replicated. A tall table (many rows) is split by rows: each rank looks up the
    # ids it owns and an all-reduce sums the partial results. A short, wide one is split
    # by columns: each rank returns a slice of every vector and an all-gather joins them.
    plan, rowwise = {}, []
    for name, table in model.embeddings.named_children():
        if table.num_embeddings >= mesh.size() * table.embedding_dim:
            plan[f"embeddings.{name}"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
            rowwise.append(table)
        else:
            plan[f"embeddings.{name}"] = ColwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    parallelize_module(model, mesh, plan)
    for table in rowwise:
        table.weight.register_post_accumulate_grad_hook(_shard_like_param)
    return model


def _shard_like_param(param: nn.Parameter) -> None:
    # DTensor (torch 2.13) returns a row-wise split table's gradient whole (Replicate) on
    # every rank; keeping only this rank's rows (a local slice, no communication) makes the
    # stored gradient as small as the weight shard, which is the point of splitting the table.
    if param.grad is not None and param.grad.placements != param.placements:
        param.grad = param.grad.redistribute(param.device_mesh, param.placements)
