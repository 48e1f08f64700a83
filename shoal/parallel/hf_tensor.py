"""Tensor parallelism for Hugging Face models, from the model's own plan.

`transformers` ships, per architecture, a `base_model_tp_plan` in its config class: which
sub-module of the base model (`LlamaModel`, ...) is split how, e.g.
`{"layers.*.self_attn.q_proj": "colwise", ..., "layers.*.mlp.down_proj": "rowwise"}`. Those
names map onto torch's own styles (ColwiseParallel, RowwiseParallel, SequenceParallel) on
the "tp" mesh, applied with `parallelize_module`, which understands the `*`:
  - colwise / rowwise (and unit_colwise / unit_rowwise, the same when the heads divide by tp);
  - colwise_rep, colwise_gather_output: colwise with the output gathered whole (Phi-3, OLMo2);
  - rowwise_rep, rowwise_split_input: rowwise taking a whole input, each rank its slice;
  - embedding_rowwise (a table split by rows, GPT-NeoX) / embedding_colwise (by columns);
  - replicated_with_grad_allreduce: whole parameters whose gradients are summed over the ranks
    (Qwen3's and Gemma3's per-head q_norm / k_norm see only this rank's heads);
  - sequence_parallel, replicate.
The mixture-of-experts and latent-attention styles (REFUSED_STYLES) are refused, naming the
module and the style, by `check_hf_layout` before any worker starts (`plan_styles` resolves the
whole plan on a meta-device model).

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
(shoal/runtime/checkpoint.py converts), so they load under any layout.
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


class _ReplicatedGradSum(ParallelStyle):
    """transformers' "replicated_with_grad_allreduce": a module whose parameters stay whole on every
    rank but whose input is this rank's part (Qwen3's and Gemma3's per-head q_norm/k_norm see only
    this rank's heads), so each rank's gradient is a part of the whole: summed over the ranks.

    During forward each parameter is used through DTensor's from_local(Replicate) ->
    to_local(grad_placements=Partial): nothing moves forward, and backward all-reduces the
    gradient of this pass (Megatron's "f" operator). Summing each pass's gradient, not the
    accumulated .grad, keeps gradient accumulation right."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        forward = module.forward

        def summed_forward(*args, **kwargs):
            own = {name: p for name, p in module._parameters.items() if p is not None}
            for name, p in own.items():
                module._parameters[name] = DTensor.from_local(p, device_mesh, [Replicate()], run_check=False) \
                    .to_local(grad_placements=[Partial()])
            try:
                return forward(*args, **kwargs)
            finally:  # the parameters themselves (FSDP's, when it gathered them for this forward)
                module._parameters.update(own)
        module.forward = summed_forward
        return module


# transformers' own style names (transformers/distributed/tensor_parallel.py registers them) that
# Shoal refuses, with the reason; every other registered name is mapped in _style
REFUSED_STYLES = {
    "packed_colwise": "fused expert weights (mixture of experts)",
    "packed_rowwise": "fused expert weights (mixture of experts)",
    "moe_tp_experts": "mixture-of-experts layers",
    "all_reduce": "mixture-of-experts outputs",
    "mla_kv_a_proj": "multi-head latent attention (DeepSeek-V2/V3)",
    "local_params": "attention sinks held as bare parameters",
}
MAPPED_STYLES = ("colwise", "rowwise", "colwise_rep", "colwise_gather_output", "rowwise_rep", "rowwise_split_input",
                 "unit_colwise", "unit_rowwise", "embedding_rowwise", "embedding_colwise", "sequence_parallel",
                 "replicated_with_grad_allreduce", "replicate", "fused_colwise")


def _style(kind: str, module: nn.Module, where: str, model: str):
    """torch's (or Shoal's) style for transformers' style `kind` on `module` (matched by `where`);
    None for "replicate"; a ConfigError naming the module and the style when there is none."""
    conv1d = type(module).__name__ == "Conv1D"
    linear = isinstance(module, nn.Linear) or conv1d
    embedding = isinstance(module, nn.Embedding)

    def refuse(why: str) -> ConfigError:
        return ConfigError(f"parallel.tp: {model}'s plan splits {where} ({type(module).__name__}) as '{kind}', "
                           f"which Shoal does not map onto torch's styles ({why}); use parallel.tp = 1 and "
                           f"parallel.dp_shard to shard it")

    if kind in REFUSED_STYLES:
        raise refuse(REFUSED_STYLES[kind])
    if kind not in MAPPED_STYLES:
        raise refuse(f"a style unknown to Shoal; it maps {', '.join(MAPPED_STYLES)}")
    if kind.startswith("embedding_") != embedding and kind not in ("replicate", "replicated_with_grad_allreduce",
                                                                  "sequence_parallel"):
        raise refuse("it splits " + ("nn.Embedding tables" if kind.startswith("embedding_") else "linear layers"))
    if not (linear or embedding) and kind not in ("replicate", "replicated_with_grad_allreduce", "sequence_parallel"):
        raise refuse("it splits linear layers and embedding tables")
    # unit_* keep whole heads on a rank, replicating heads when there are fewer than ranks; Shoal
    # requires the heads to divide by tp (check_hf_layout), where they are colwise/rowwise
    if kind in ("colwise", "unit_colwise"):
        return _Conv1DColwise() if conv1d else ColwiseParallel()
    if kind in ("rowwise", "unit_rowwise"):
        return _Conv1DRowwise() if conv1d else RowwiseParallel()
    if conv1d and kind != "fused_colwise":
        raise refuse("Conv1D layers are split colwise, rowwise or fused_colwise")
    if kind in ("colwise_rep", "colwise_gather_output", "embedding_colwise"):
        return ColwiseParallel(output_layouts=Replicate())  # the output gathered whole on every rank
    if kind in ("rowwise_rep", "rowwise_split_input", "embedding_rowwise"):
        # a whole input, each rank using its slice of it (or, for a table, looking up the ids it
        # holds); the partial results summed
        return RowwiseParallel(input_layouts=Replicate())
    if kind == "sequence_parallel":
        return SequenceParallel()
    if kind == "replicated_with_grad_allreduce":
        return _ReplicatedGradSum()
    if kind == "fused_colwise":
        return _FusedColwise(FUSED_PARTS)
    return None  # "replicate": every rank keeps the whole module


def tp_plan(config) -> dict[str, str]:
    """A model config's tensor-parallel plan, relative to its base model; empty when it has none."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return dict(getattr(config, "base_model_tp_plan", None) or EXTRA_PLANS.get(config.model_type, {}))


def plan_styles(model: nn.Module, tp: int) -> dict[str, ParallelStyle]:
    """The style of every module of `model`'s base model that its plan splits, by module name;
    a ConfigError, naming the module and the style, for anything Shoal cannot split. Needs only
    the shapes: `check_hf_layout` calls it on a meta-device model before any worker starts."""
    plan = tp_plan(model.config)
    name = type(model).__name__
    if not plan:
        raise ConfigError(f"parallel.tp = {tp}: {name} ({model.config.model_type}) has no tensor-parallel plan "
                          f"(config.base_model_tp_plan); use parallel.tp = 1 and parallel.dp_shard to shard it")
    base = model.base_model
    modules = dict(base.named_modules())
    parameters = [n for n, _ in base.named_parameters()]
    styles = {}
    for pattern, kind in plan.items():
        # one style object per matched module: Conv1D and Linear need different ones
        matched = [n for n in modules if _matches(n, pattern)]
        if not matched and any(_matches(n, pattern) for n in parameters):
            raise ConfigError(f"parallel.tp: {name}'s plan splits the parameter {pattern} as '{kind}'; Shoal splits "
                              f"modules only (use parallel.tp = 1 and parallel.dp_shard to shard it)")
        for module_name in matched:
            style = _style(kind, modules[module_name], pattern, name)
            if style is not None:
                styles[module_name] = style
    if not styles:
        raise ConfigError(f"parallel.tp: the plan of {name} matched no module ({', '.join(plan)})")
    # the attention cuts a fused output at split_size, which becomes the local width: checked before any split
    for module_name, style in styles.items():
        parent = modules[module_name.rpartition(".")[0]]
        if isinstance(style, _FusedColwise) and not hasattr(parent, "split_size"):
            raise ConfigError(f"parallel.tp: {type(parent).__name__} holds a 'fused_colwise' projection but has no "
                              f"split_size to cut its output at")
    return styles


def apply_hf_tp(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Split a PreTrainedModel over the 1-D "tp" `mesh` in place, following its own plan."""
    base = model.base_model
    styles = plan_styles(model, mesh.size())
    fused_parents = [base.get_submodule(name.rpartition(".")[0]) for name, style in styles.items()
                     if isinstance(style, _FusedColwise)]
    parallelize_module(base, mesh, styles)
    for parent in fused_parents:
        parent.split_size //= mesh.size()
    return model


def _matches(name: str, pattern: str) -> bool:
    parts, atoms = name.split("."), pattern.split(".")
    return len(parts) == len(atoms) and all(a == "*" or a == p for a, p in zip(atoms, parts))
