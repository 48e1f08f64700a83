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

GPT-2 has no plan in transformers (its q, k and v live fused in one `Conv1D`, transposed
against nn.Linear); Shoal's table below splits its MLP (c_fc by columns, c_proj by rows) and
leaves attention whole on every rank.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel, SequenceParallel,
                                               parallelize_module)

from shoal.config import ConfigError

# Plans for architectures whose transformers config has none (names relative to the base model).
EXTRA_PLANS: dict[str, dict[str, str]] = {
    "gpt2": {"h.*.mlp.c_fc": "colwise", "h.*.mlp.c_proj": "rowwise"},
}


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
    if kind == "replicate":
        return None
    raise ConfigError(f"parallel.tp: the model's plan splits {where} as '{kind}', which Shoal does not map "
                      f"onto torch's styles (it knows colwise, rowwise, colwise_rep, rowwise_rep, "
                      f"sequence_parallel, replicate)")


def hf_plan(model: nn.Module) -> dict[str, str]:
    """The model's tensor-parallel plan, relative to its base model; empty when it has none."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return dict(getattr(config, "base_model_tp_plan", None) or EXTRA_PLANS.get(config.model_type, {}))


def apply_hf_tp(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Split a PreTrainedModel over the 1-D "tp" `mesh` in place, following its own plan."""
    plan = hf_plan(model)
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
    parallelize_module(base, mesh, styles)
    return model


def _matches(name: str, pattern: str) -> bool:
    parts, atoms = name.split("."), pattern.split(".")
    return len(parts) == len(atoms) and all(a == "*" or a == p for a, p in zip(atoms, parts))
