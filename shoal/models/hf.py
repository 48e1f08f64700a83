"""Hugging Face `transformers` models as they are: loaded from a local folder, called the way
they expect, their outputs read for logits or loss.

A folder is what `save_pretrained` writes: `config.json` (whose `architectures` names the
class) and, when trained weights exist, the weights in any of transformers' layouts (one or
several safetensors files, one or several `.bin` files; shoal/models/hf_weights.py). Without
weights the model is initialised from the config with the current torch seed, so every rank
builds the same one, and the log says so once.
Nothing is downloaded: `local_files_only` holds for the config and the weights.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shoal.config import ConfigError
from shoal.models.hf_weights import (LAYOUTS, checkpoint_keys, compare_keys, describe_keys, parameters_on_meta,
                                     weight_files)

log = logging.getLogger("shoal")


def read_hf_config(path: str, field: str = "model.hf") -> Any:
    """The `transformers` config of the folder `path`; a ConfigError names `field` when the
    folder, its config.json or its architecture is missing."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{field} = '{path}': no config.json in that folder (save one with "
                          f"model.save_pretrained(PATH) or config.save_pretrained(PATH))")
    try:
        raw = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{field} = '{path}': config.json is not valid JSON: {err}") from None
    import transformers
    model_type = raw.get("model_type", "")
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (ValueError, KeyError, OSError) as err:
        raise ConfigError(f"{field} = '{path}': model_type '{model_type}' is unknown to the installed "
                          f"transformers {transformers.__version__} ({str(err).splitlines()[0]})") from None
    return config


def model_class(config: Any, path: str, field: str = "model.hf") -> type:
    """The class named first in the config's `architectures`, from the installed transformers."""
    import transformers
    names = list(getattr(config, "architectures", None) or [])
    if not names:
        raise ConfigError(f"{field} = '{path}': config.json names no `architectures` (which class to build)")
    cls = getattr(transformers, names[0], None)
    if cls is None:
        raise ConfigError(f"{field} = '{path}': architecture '{names[0]}' is not in the installed transformers "
                          f"{transformers.__version__}")
    return cls


def load_hf(path: str, *, params_on_meta: bool = False, folder_weights: bool = True) -> nn.Module:
    """The model of folder `path`: its trained weights in any layout save_pretrained writes
    (hf_weights.LAYOUTS), otherwise initialised from config.json with the current seed.

    `params_on_meta`: for a layout that shards the model (FSDP, TP, PP), leave the parameters on
    the meta device when the checkpoint holds every one of them; `hf_weights.load_per_rank`
    then reads each rank's share once the layout has split it. Anything else (weights missing or
    named otherwise) loads the whole model here, through transformers' own `from_pretrained`.
    `folder_weights=False`: the shapes only, initialised from the seed (a run's checkpoint
    replaces every weight next: export, predict, serve)."""
    config = read_hf_config(path)
    cls = model_class(config, path)
    # under a meta device (shoal plan sizes the model without memory) there is nothing to load into
    if torch.get_default_device().type == "meta" or not folder_weights:
        return prepare(cls._from_config(config))
    if not weight_files(path):
        say_once(f"model.hf = '{path}' holds no weights ({', '.join(LAYOUTS)}): training from scratch, "
                 f"initialised from config.json and train.seed")
        return prepare(cls._from_config(config))
    if params_on_meta:
        with parameters_on_meta():
            model = cls._from_config(config)
        missing, unexpected = compare_keys(model, set(checkpoint_keys(path)))
        if not missing:
            if unexpected:
                say_once(describe_keys(path, [], unexpected))
            return prepare(model)
        say_once(f"model.hf = '{path}': {len(missing)} weights are not in the checkpoint under the model's names; "
                 f"every rank loads the whole model before it is sharded")
    return prepare(_from_pretrained(cls, config, path))


def _from_pretrained(cls: type, config: Any, path: str) -> nn.Module:
    """transformers' own loader (every layout, renamed legacy keys, tied weights), its
    multi-line load report replaced by one line."""
    import transformers
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        model, info = cls.from_pretrained(path, config=config, local_files_only=True, output_loading_info=True)
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()
    mismatched = [key[0] if isinstance(key, tuple) else key for key in info.get("mismatched_keys", ())]
    if info["missing_keys"] or info["unexpected_keys"] or mismatched:
        say_once(describe_keys(path, list(info["missing_keys"]), list(info["unexpected_keys"]), mismatched))
    return model


def say_once(message: str) -> None:
    """A warning every rank would give alike, given by rank 0 only."""
    if os.environ.get("RANK", "0") == "0":
        log.warning(message)


def is_hf(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


def prepare(model: nn.Module) -> nn.Module:
    """Training settings for a PreTrainedModel: no key/value cache (it only costs memory when
    every step sees a whole sequence), outputs as ModelOutput."""
    if is_hf(model):
        model.config.use_cache = False
        model.train(True)
    return model


def call_model(model: nn.Module, inputs: Any, labels: torch.Tensor | None = None) -> Any:
    """Run `model` on a batch the way it expects it: a dict's entries as keyword arguments
    (input_ids, attention_mask, pixel_values, labels...), a tensor as the first positional
    argument (a tokens model's input_ids, a vision model's pixel_values). `labels`, when
    given and not already in the dict, is passed by name (for the model's own loss), contiguous
    (a token source's targets are a view of its window; T5's loss calls labels.view(-1)).

    An encoder-decoder model (T5, BART) on token data: the encoder reads each sample and the
    decoder learns its next tokens (the labels, which transformers shifts right into the
    decoder's inputs); that needs the labels, so it needs model.loss = 'model'."""
    if labels is not None:
        labels = labels.contiguous()
    if isinstance(inputs, dict):
        if labels is not None and "labels" not in inputs:
            inputs = {**inputs, "labels": labels}
        return model(**inputs)
    if labels is not None:
        return model(inputs, labels=labels)
    if getattr(getattr(getattr(model, "module", model), "config", None), "is_encoder_decoder", False):  # DDP wraps
        raise ConfigError(f"model.hf: {type(model).__name__} is an encoder-decoder model, whose decoder needs the "
                          f"targets: set model.loss = 'model' (on token data the encoder reads each sample and the "
                          f"decoder learns its next tokens), or give dict samples with input_ids and labels")
    return model(inputs)


def logits_of(output: Any) -> torch.Tensor:
    """The prediction tensor in a model's output: a tensor itself, `.logits` of a ModelOutput
    or a dict, or the first tensor of a tuple that is not a loss."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) or hasattr(output, "keys"):  # ModelOutput is an OrderedDict
        for key in ("logits", "prediction_logits", "last_hidden_state"):
            if key in output and output[key] is not None:
                return output[key]
        raise TypeError(f"model output has no logits (keys: {', '.join(output.keys())}); "
                        f"set model.loss = 'model' or a loss function")
    if isinstance(output, (tuple, list)) and output:
        return output[0]
    raise TypeError(f"cannot read logits from a model output of type {type(output).__name__}")


def loss_of(output: Any) -> torch.Tensor:
    """The model's own loss: `.loss` / ['loss'], or the first element of a tuple."""
    if isinstance(output, dict) or hasattr(output, "keys"):
        loss = output.get("loss") if hasattr(output, "get") else None
    elif isinstance(output, (tuple, list)) and output:
        loss = output[0]
    else:
        loss = None
    if loss is None:
        raise ConfigError("model.loss = 'model', but the model's output has no loss (pass labels in the data, "
                          "or use the built-in loss: model.loss = '')")
    return loss


def meta_model(path: str) -> nn.Module:
    """The model of folder `path` with shapes only (no memory, no weights read)."""
    config = read_hf_config(path)
    cls = model_class(config, path)
    with torch.device("meta"):
        return cls._from_config(config)

