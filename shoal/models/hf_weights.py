"""The weights of a Hugging Face folder, in every layout `save_pretrained` writes, and
loading them per rank at any size.

Layouts: `model.safetensors`; `model.safetensors.index.json` + its parts (how every model above
a few GB is published); `pytorch_model.bin`; `pytorch_model.bin.index.json` + its parts. A
`.bin` is read with `torch.load(weights_only=True, mmap=True)`: tensors only, nothing else
unpickled, and only the pages a rank touches come into memory.

Loading at size (under FSDP, TP or PP): each rank builds the model with its parameters on the
meta device (no memory; buffers such as rotary frequencies stay real and small), lets the
layout shard it, then fills only what it holds, file by file and tensor by tensor. A shard that
is one block of the tensor (FSDP's and TP's `Shard`) is read as that block alone
(`safe_open(...).get_slice`); any other placement reads the one tensor whole and cuts it with
DTensor's own split, without communication. Peak memory per rank: its share plus one tensor,
not the whole model. This is torchtitan's meta-device initialisation (Liang et al., "TorchTitan:
One-stop PyTorch native solution for production ready LLM pre-training", 2024), applied to
reading a checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

log = logging.getLogger("shoal")

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
PICKLE, PICKLE_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
LAYOUTS = (SAFETENSORS_INDEX, SAFETENSORS, PICKLE_INDEX, PICKLE)
"""The weight layouts in the order transformers prefers them when a folder holds several."""


def weight_files(folder: str | Path) -> list[Path]:
    """The files holding the folder's weights, in the first layout present; [] when it has none."""
    folder = Path(folder)
    for name in LAYOUTS:
        path = folder / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            parts = dict.fromkeys(json.loads(path.read_text())["weight_map"].values())
            return [folder / part for part in parts]
        return [path]
    return []


def checkpoint_keys(folder: str | Path) -> dict[str, Path]:
    """Every tensor name in the folder's weights, with the file that holds it (read from the
    index or the files' headers; no tensor is read)."""
    folder = Path(folder)
    for index in (SAFETENSORS_INDEX, PICKLE_INDEX):
        if (folder / index).is_file():
            weight_map = json.loads((folder / index).read_text())["weight_map"]
            return {key: folder / part for key, part in weight_map.items()}
    keys: dict[str, Path] = {}
    for path in weight_files(folder):
        with open_weights(path) as tensors:
            keys.update(dict.fromkeys(tensors.keys(), path))
    return keys


class _PickledTensors:
    """A `.bin` file behind safetensors' `safe_open` face: keys() and get_slice(key)[slices]."""

    def __init__(self, path: Path):
        self.tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)

    def keys(self):
        return self.tensors.keys()

    def get_slice(self, key: str) -> torch.Tensor:
        return self.tensors[key]  # mmap'd: indexing it touches only the pages of the slice

    def get_tensor(self, key: str) -> torch.Tensor:
        return self.tensors[key]


@contextlib.contextmanager
def open_weights(path: Path) -> Iterator:
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as tensors:
            yield tensors
    else:
        yield _PickledTensors(path)


def tied_aliases(model: nn.Module) -> dict[str, set[str]]:
    """For each parameter name, the other names of the same tensor (an output layer tied to
    the input embeddings): a checkpoint holds one of them."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return {name: set(group) - {name} for group in names.values() for name in group}


def compare_keys(model: nn.Module, present: set[str]) -> tuple[list[str], list[str]]:
    """(missing, unexpected): the model's weights and persistent buffers the checkpoint lacks
    (a tied weight whose twin is present is not missing), and the checkpoint's names the model
    has no place for."""
    wanted = set(model.state_dict().keys())
    aliases = tied_aliases(model)
    missing = sorted(key for key in wanted - present if not aliases.get(key, set()) & present)
    unexpected = sorted(present - wanted - {a for key in wanted for a in aliases.get(key, ())})
    return missing, unexpected


def describe_keys(path: str, missing: list[str], unexpected: list[str], mismatched: list[str] = ()) -> str:
    """One line for weights that did not load, with counts and the first few names."""
    def some(keys) -> str:
        keys = sorted(keys)
        return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
    parts = []
    if missing:
        parts.append(f"{len(missing)} weights not in the checkpoint, initialised from train.seed ({some(missing)})")
    if mismatched:
        parts.append(f"{len(mismatched)} of another shape, initialised from train.seed ({some(mismatched)})")
    if unexpected:
        parts.append(f"{len(unexpected)} in the checkpoint that the model has no place for, ignored "
                     f"({some(unexpected)})")
    return f"model.hf = '{path}': " + "; ".join(parts)


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (no memory) and their
    buffers as usual: rotary frequencies and other non-persistent buffers are computed at
    construction, are in no checkpoint, and are small."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            on_meta = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
            on_meta.__dict__.update(param.__dict__)  # flags transformers sets on a parameter
            module._parameters[name] = on_meta

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _block_of(local: torch.Tensor) -> tuple[slice, ...] | None:
    """The slices of the full tensor a DTensor shard holds, when they are one block (only plain
    `Shard` and `Replicate` placements); None for other placements (strided or partial)."""
    from torch.distributed.tensor import Replicate, Shard
    if any(type(p) not in (Shard, Replicate) for p in local.placements):
        return None
    chunks = local.__create_chunk_list__()  # DCP's own description of what this rank holds
    if len(chunks) != 1:
        return None
    return tuple(slice(o, o + s) for o, s in zip(chunks[0].offsets, chunks[0].sizes))


@torch.no_grad()
def _fill(target: torch.Tensor, tensors, key: str) -> None:
    """Copy this rank's part of checkpoint tensor `key` into `target` (a tensor or DTensor)."""
    from shoal.runtime.lazy import dtensor_type
    if not isinstance(target, dtensor_type()):
        target.copy_(tensors.get_tensor(key))
        return
    local = target.to_local()
    if local.numel() == 0:
        return
    block = _block_of(target)
    if block is not None:
        local.copy_(tensors.get_slice(key)[block])
        return
    from torch.distributed.tensor import distribute_tensor
    whole = tensors.get_tensor(key)
    # each rank has the whole tensor here: the split happens locally, with no collective
    local.copy_(distribute_tensor(whole, target.device_mesh, target.placements, src_data_rank=None).to_local())


def load_per_rank(parts: list[nn.Module], folder: str | Path, device: torch.device,
                  aliases: dict[str, set[str]] | None = None) -> int:
    """Materialise the meta parameters of `parts` (this rank's share of a sharded, split or
    tensor-parallel model) on `device` and read their values from the folder's weights, file by
    file, each rank only the tensors or slices it holds. `aliases`: the whole model's tied
    names (`tied_aliases`, taken before the split): a pipeline stage may hold the output layer
    without the embeddings it is tied to, which the checkpoint stores once. Returns the number
    of tensors read."""
    aliases = aliases or {}
    targets: dict[str, list[torch.Tensor]] = {}
    for part in parts:
        buffers = {name: buf.detach().clone() for name, buf in part.named_buffers()}
        part.to_empty(device=device)
        with torch.no_grad():
            for name, buf in part.named_buffers():
                buf.copy_(buffers[name])  # to_empty left them uninitialised; they were built real
        for name, tensor in list(part.named_parameters(remove_duplicate=False)) + list(part.named_buffers()):
            targets.setdefault(name, []).append(tensor)
    held = checkpoint_keys(folder)
    persistent = {name for part in parts for name in part.state_dict().keys()}  # not rotary frequencies
    files: dict[Path, list[tuple[str, str]]] = {}
    unread = []
    for name in targets:
        source = name if name in held else next((a for a in sorted(aliases.get(name, ())) if a in held), None)
        if source is not None:
            files.setdefault(held[source], []).append((source, name))
        elif name in persistent:
            unread.append(name)
    if unread:  # load_hf chose this path because nothing was missing: an internal error, never silent
        raise RuntimeError(f"model.hf = '{folder}': no checkpoint tensor for {', '.join(unread[:3])}")
    read = 0
    for path, pairs in files.items():
        with open_weights(path) as tensors:
            for source, name in pairs:
                for target in targets[name]:
                    _fill(target, tensors, source)
                read += 1
    return read

