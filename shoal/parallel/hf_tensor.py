"""Tensor parallelism for Hugging Face models, from the model's own plan.

`transformers` ships, per architecture, a `base_model_tp_plan` in its config class: which
sub-module of the base model (`LlamaModel`, ...) is split how, e.g.
`{"layers.*.self_attn.q_proj": "colwise", ..., "layers.*.mlp.down_proj": "rowwise"}`. Those
names map onto torch's own styles (ColwiseParallel, RowwiseParallel, SequenceParallel) on
the "tp" mesh, applied with `parallelize_module`, which understands the `*`.

Why this works on an unchanged model: HF attention reshapes its projections with a head
count of -1 (`view(*input_shape, -1, head_dim)`), so a rank whose q/k/v projections hold
1/tp of the output columns simply sees 1/tp of the heads; the row-parallel output
projection then sums the partial results (one all-reduce per attention and per MLP, as in
Megatron-LM). The heads (and key/value heads) must divide by tp, which `check_layout`
checks from the config before any worker starts.

GPT-2 has no plan in transformers: its q, k and v live fused in one `Conv1D` (transposed
against nn.Linear), whose output the attention cuts in three at `split_size`. Shoal's table
below gives it one. The fused projection is split "fused_colwise": each third (q, k, v) is cut
by columns and a rank holds its part of each, [q_r | k_r | v_r] (the placement is torch's
`_StridedShard(dim, split_factor=3)`), so it computes whole heads of q, k and v; the attention
module's `split_size` becomes hidden / tp. Checkpoints hold such weights as plain `Shard`
(shoal/fault/checkpoint.py converts), so they load under any layout.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (ColwiseParallel, ParallelStyle, RowwiseParallel, SequenceParallel,
                                               parallelize_module)
from torch.distributed.tensor.placement_types import _StridedShard

from shoal.config import ConfigError

# Plans for architectures whose transformers config has none (names relative to the base model).
EXTRA_PLANS: dict[str, dict[str, str]] = {
    "gpt2": {"h.*.attn.c_attn": "fused_colwise", "h.*.attn.c_proj": "rowwise",
             "h.*.mlp.c_fc": "colwise", "h.*.mlp.c_proj": "rowwise"},
}
FUSED_PARTS = 3
"""A "fused_colwise" projection holds q, k and v side by side, cut apart at the parent's `split_size`."""


class _Conv1DColwise(ColwiseParallel):
    """ColwiseParallel for transformers' Conv1D, whose weight is [in, out] (nn.Linear's transpose)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def partition(name, mod, mesh):
            mod.register_parameter("weight", nn.Parameter(distribute_tensor(mod.weight, mesh, [Shard(1)])))
            mod.register_parameter("bias", nn.Parameter(distribute_tensor(mod.bias, mesh, [Shard(0)])))
        return distribute_module(module, device_mesh, partition,
                                 lambda mod, inputs, mesh: self._prepare_input_fn(
                                     self.input_layouts, self.desired_input_layouts, mod, inputs, mesh),
                                 lambda mod, outputs, mesh: self._prepare_output_fn(
                                     self.output_layouts, self.use_local_output, mod, outputs, mesh))


class _Conv1DRowwise(RowwiseParallel):
    """RowwiseParallel for Conv1D: the weight's rows are its inputs."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        self.desired_input_layouts = (Shard(-1),)

        def partition(name, mod, mesh):
            mod.register_parameter("weight", nn.Parameter(distribute_tensor(mod.weight, mesh, [Shard(0)])))
            mod.register_parameter("bias", nn.Parameter(distribute_tensor(mod.bias, mesh, [Replicate()])))
        return distribute_module(module, device_mesh, partition,
                                 lambda mod, inputs, mesh: self._prepare_input_fn(
                                     self.input_layouts, self.desired_input_layouts, mod, inputs, mesh),
                                 lambda mod, outputs, mesh: self._prepare_output_fn(
                                     self.output_layouts, self.use_local_output, mod, outputs, mesh))


class _FusedColwise(ParallelStyle):
    """Column parallelism for a projection whose output is `parts` tensors side by side (GPT-2's
    c_attn: q | k | v): each rank holds 1/tp of each part, so the parts stay whole heads.

    The forward runs on the local shards. Its input is the same on every rank; declaring the
    input's gradient Partial makes DTensor sum it over the ranks in backward (Megatron's "f")."""

    def __init__(self, parts: int):
        super().__init__()
        self.parts = parts

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        conv1d = type(module).__name__ == "Conv1D"  # weight [in, out]; nn.Linear's is [out, in]
        out_dim = 1 if conv1d else 0
        weight = distribute_tensor(module.weight.data, device_mesh, [_StridedShard(out_dim, split_factor=self.parts)])
        module.register_parameter("weight", nn.Parameter(weight))
        if module.bias is not None:
            bias = distribute_tensor(module.bias.data, device_mesh, [_StridedShard(0, split_factor=self.parts)])
            module.register_parameter("bias", nn.Parameter(bias))

        def forward(x):
            x = DTensor.from_local(x, device_mesh, [Replicate()], run_check=False).to_local(
                grad_placements=[Partial()])
            w = module.weight.to_local()
            b = module.bias.to_local() if module.bias is not None else None
            if conv1d:
                out = x.reshape(-1, x.size(-1)) @ w + (b if b is not None else 0)
                return out.view(*x.shape[:-1], w.size(1))
            return nn.functional.linear(x, w, b)
        module.forward = forward
        return module


def _style(kind: str, module: nn.Module, where: str):
    conv1d = type(module).__name__ == "Conv1D"
    if kind == "colwise":
        return _Conv1DColwise() if conv1d else ColwiseParallel()
    if kind == "rowwise":
        return _Conv1DRowwise() if conv1d else RowwiseParallel()
    if kind in ("colwise_rep", "colwise_gather_output"):
        return ColwiseParallel(output_layouts=Replicate())
    if kind == "rowwise_rep":
        return RowwiseParallel(input_layouts=Replicate())
    if kind == "sequence_parallel":
        return SequenceParallel()
    if kind == "fused_colwise":
        return _FusedColwise(FUSED_PARTS)
    if kind == "replicate":
        return None
    raise ConfigError(f"parallel.tp: the model's plan splits {where} as '{kind}', which Shoal does not map "
                      f"onto torch's styles (it knows colwise, rowwise, colwise_rep, rowwise_rep, "
                      f"sequence_parallel, replicate, fused_colwise)")


def tp_plan(config) -> dict[str, str]:
    """A model config's tensor-parallel plan, relative to its base model; empty when it has none."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return dict(getattr(config, "base_model_tp_plan", None) or EXTRA_PLANS.get(config.model_type, {}))


def apply_hf_tp(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Split a PreTrainedModel over the 1-D "tp" `mesh` in place, following its own plan."""
    plan = tp_plan(model.config)
    if not plan:
        raise ConfigError(f"parallel.tp = {mesh.size()}: {type(model).__name__} ({model.config.model_type}) has "
                          f"no tensor-parallel plan (config.base_model_tp_plan); use parallel.tp = 1 and "
                          f"parallel.dp_shard to shard it")
    base = model.base_model
    styles = {}
    for pattern, kind in plan.items():
        # one style object per matched module: Conv1D and Linear need different ones
        for name, module in base.named_modules():
            if _matches(name, pattern):
                style = _style(kind, module, pattern)
                if style is not None:
                    styles[name] = style
    if not styles:
        raise ConfigError(f"parallel.tp: the plan of {type(model).__name__} matched no module "
                          f"({', '.join(plan)})")
    # the attention cuts a fused output at split_size, which becomes the local width: checked before any split
    fused_parents = [base.get_submodule(name.rpartition(".")[0]) for name, style in styles.items()
                     if isinstance(style, _FusedColwise)]
    for parent in fused_parents:
        if not hasattr(parent, "split_size"):
            raise ConfigError(f"parallel.tp: {type(parent).__name__} holds a 'fused_colwise' projection but has no "
                              f"split_size to cut its output at")
    parallelize_module(base, mesh, styles)
    for parent in fused_parents:
        parent.split_size //= mesh.size()
    return model


def _matches(name: str, pattern: str) -> bool:
    parts, atoms = name.split("."), pattern.split(".")
    return len(parts) == len(atoms) and all(a == "*" or a == p for a, p in zip(atoms, parts))
