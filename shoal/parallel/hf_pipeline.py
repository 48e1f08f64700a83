"""Pipeline stages of an unchanged Hugging Face decoder (GPT-2-, Llama-, Qwen2-, Mistral-style).

A stage is a pruned copy of the model itself (same class, same parameter names, so a
checkpoint written under any pipeline degree loads under any other), holding:
  - stage 0: the input embeddings (and learned positions) and its share of the layers;
  - middle stages: their layers;
  - the last stage: its layers, the final norm and the LM head.
Its forward runs the model's own code: the first stage calls the base model on `input_ids`,
the others on `inputs_embeds` (the hidden states from the stage before). Where a stage does
not hold a part, that part becomes a parameter-free stand-in: the final norm an identity;
learned position embeddings zeros (stage 0 already added them); embedding dropout an
identity (stage 0 already applied it).

The decoder layers are kept in a ModuleList whose keys are their original indices
("2", "3"), so `model.layers.2.mlp...` keeps its name on the stage that holds it; the model
only iterates (or slices) the list, which a list with gaps allows.

Each layer keeps its identity: the layer modules are moved, not rebuilt, so what a layer set
from its global index when it was built (`layer_idx`, its attention type, window, rope) stays.
But the model's forward reads some per-layer settings from its config by the layer's position
in the list (`config.layer_types[i]` picks Gemma2's, Gemma3's or Qwen3's sliding-window or full
mask and rope), and on a stage that position starts at 0 again. So each stage gets its own copy
of the config whose per-layer lists are cut to its layers: position i of stage s is layer
`ranges[s][i]` in the config too.

Tied input/output embeddings (GPT-2) end up on the first and the last stage; their
gradients are summed over the pipeline group before the optimizer step (`tied_names`).
"""

from __future__ import annotations

import copy
import types

import torch
from torch import nn

from shoal.config import ConfigError


class _Zeros(nn.Module):
    """Stands in for a learned position embedding on stages after the first."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*ids.shape, self.dim, device=ids.device)


def _layers_name(base: nn.Module) -> str:
    """The base model's attribute holding its decoder layers: the longest ModuleList of one class."""
    best, size = "", 0
    for name, child in base.named_children():
        if isinstance(child, nn.ModuleList) and len(child) > size and len({type(m) for m in child}) == 1:
            best, size = name, len(child)
    if not best:
        raise ConfigError(f"parallel.pp: {type(base).__name__} has no ModuleList of layers to split into stages")
    return best


def hf_num_layers(model: nn.Module) -> int:
    return len(getattr(model.base_model, _layers_name(model.base_model)))


def tied_names(model: nn.Module) -> list[list[str]]:
    """Groups of parameter names that share one tensor (tied embeddings)."""
    seen: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        seen.setdefault(id(param), []).append(name)
    return [names for names in seen.values() if len(names) > 1]


def split_hf(model: nn.Module, ranges: list[range], stage_ids: list[int]) -> list[nn.Module]:
    """The stages `stage_ids` of `model` (layer index ranges per stage in `ranges`)."""
    base = model.base_model
    prefix = model.base_model_prefix
    head = model.get_output_embeddings()
    head_name = next((n for n, m in model.named_children() if m is head), None) if head is not None else None
    others = [n for n, m in model.named_children()
              if n not in (prefix, head_name) and any(True for _ in m.parameters())]
    if head_name is None or others:
        raise ConfigError(f"parallel.pp: {type(model).__name__} is not a decoder with an LM head (pipeline stages "
                          f"split causal LMs); use parallel.pp = 1")
    layers_name = _layers_name(base)
    layers = getattr(base, layers_name)
    embed = base.get_input_embeddings()
    owned = {n: m for n, m in base.named_children() if any(True for _ in m.parameters())}
    # a parameter-free skeleton, copied per stage; the modules are moved into it, never copied
    for name in owned:
        setattr(base, name, None)
    setattr(model, head_name, None)
    skeleton = copy.deepcopy(model)
    for name, module in owned.items():
        setattr(base, name, module)
    setattr(model, head_name, head)

    n_stages = len(ranges)
    parts = []
    for sid in stage_ids:
        first, last = sid == 0, sid == n_stages - 1
        part = copy.deepcopy(skeleton)
        pbase = part.base_model
        kept = nn.ModuleList()
        for i in ranges[sid]:
            kept._modules[str(i)] = layers[i]  # original index as the key: the names stay the full model's
        setattr(pbase, layers_name, kept)
        for name, module in owned.items():
            if name == layers_name:
                continue
            if isinstance(module, nn.Embedding):
                if first:
                    setattr(pbase, name, module)
                elif module is not embed:  # learned positions: stage 0 has added them
                    setattr(pbase, name, _Zeros(module.embedding_dim))
                else:
                    setattr(pbase, name, nn.Identity())  # not called: later stages pass inputs_embeds
            else:  # the final norm (anything after the layers)
                setattr(pbase, name, module if last else nn.Identity())
        if not first:
            for name, child in list(pbase.named_children()):
                if isinstance(child, nn.Dropout):  # embedding dropout: applied once, on stage 0
                    setattr(pbase, name, nn.Identity())
        setattr(part, head_name, head if last else nn.Identity())
        _cut_per_layer_settings(part.base_model.config, ranges[sid], len(layers))
        part.forward = types.MethodType(_stage_forward(first, last), part)
        parts.append(part)
    return parts


def _cut_per_layer_settings(config, kept: range, n_layers: int) -> None:
    """Cut the per-layer lists of a stage's own config copy (`layer_types`, `no_rope_layers`...:
    a list with one entry per layer, named after layers) to the layers `kept`."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key, value in list(vars(text).items()):
        if "layer" in key and isinstance(value, (list, tuple)) and len(value) == n_layers:
            setattr(text, key, type(value)(value[kept.start:kept.stop]))


def _stage_forward(first: bool, last: bool):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kwargs = {"input_ids": x} if first else {"inputs_embeds": x}
        if last:
            return type(self).forward(self, **kwargs).logits
        return self.base_model(**kwargs).last_hidden_state
    return forward
