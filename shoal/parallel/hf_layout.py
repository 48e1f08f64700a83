"""What a layout needs from a Hugging Face model (`model.hf`), checked from its config on the meta
device before any worker starts: a tensor-parallel plan whose every style Shoal applies
(shoal/parallel/hf_tensor.py), heads that divide by the TP degree, no more pipeline stages than
layers, and the FSDP block names it is asked to shard (shoal/parallel/blocks.py). Called by
`check_layout` in shoal/parallel/compose.py."""

from __future__ import annotations

from shoal.config import ConfigError
from shoal.models.hf import meta_model, model_class, read_hf_config
from shoal.parallel.blocks import named_blocks
from shoal.parallel.hf_tensor import plan_styles, tp_plan


def check_hf_layout(path: str, shard_modules: list[str], tp: int, stages: int) -> None:
    """Refuse, with a ConfigError naming the field, a layout that model folder `path` cannot take:
    `tp` ranks per tensor-parallel group, `stages` pipeline stages in all, FSDP units `shard_modules`."""
    config = read_hf_config(path)
    model_class(config, path)
    if shard_modules:
        named_blocks(meta_model(path), shard_modules)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if tp > 1:
        if not tp_plan(text):
            raise ConfigError(f"parallel.tp = {tp}: model.hf = '{path}' ({text.model_type}) has no "
                              f"tensor-parallel plan (config.base_model_tp_plan); use parallel.tp = 1 and "
                              f"parallel.dp_shard to shard it")
        for key in ("num_attention_heads", "num_key_value_heads"):
            heads = getattr(text, key, None)
            if heads and heads % tp:
                raise ConfigError(f"parallel.tp = {tp} must divide the model's {key} = {heads} (each rank holds "
                                  f"whole heads)")
        plan_styles(meta_model(path), tp)  # every style of the plan is one Shoal can apply
    layers = getattr(text, "num_hidden_layers", 0)
    if stages > 1 and layers and stages > layers:
        raise ConfigError(f"parallel.pp: {stages} pipeline stages but model.hf has num_hidden_layers = {layers}")
