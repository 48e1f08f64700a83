"""Which submodules of a model are its repeated "blocks": the unit that activation
checkpointing recomputes, torch.compile compiles and FSDP gathers one at a time.

Found, in this order: the classes named in `parallel.shard_modules`; a gpt's layers; the
classes a Hugging Face model lists in `_no_split_modules` (the ones it says must stay whole
on one device: its decoder layers, sometimes its embeddings); the members of a ModuleList
whose members share one class (the layers of most hand-written transformers); the Linear
layers of an MLP. Only then the top-level children, which for most models is one unit
holding nearly everything — the case the steps before exist to avoid.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Sequence

from torch import nn

from shoal.config import ConfigError


def model_blocks(model: nn.Module, names: Sequence[str] = ()) -> list[nn.Module]:
    """The blocks of `model`, outermost first-come (a block never contains another)."""
    if names:
        return named_blocks(model, names)
    layers = getattr(model, "layers", None)
    if isinstance(layers, nn.ModuleDict) and not hasattr(model, "config"):  # shoal's gpt (or a stage of it)
        return list(layers.values())
    no_split = getattr(model, "_no_split_modules", None)
    if no_split:
        blocks = _outermost(model, set(no_split))
        if blocks:
            return blocks
    repeated = _repeated_members(model)
    if repeated:
        return repeated
    if isinstance(model, nn.Sequential):
        return [m for m in model if isinstance(m, nn.Linear)]
    blocks = []
    for child in model.children():
        # containers have no forward of their own: their members are the blocks (dlrm's tables)
        members = list(child.children()) if isinstance(child, (nn.ModuleList, nn.ModuleDict)) else [child]
        blocks += [m for m in members if _has_params(m)]
    return blocks


def named_blocks(model: nn.Module, names: Sequence[str]) -> list[nn.Module]:
    """The outermost submodules whose class is one of `names`; a name that matches nothing is a
    ConfigError listing the classes the model has."""
    present = {type(m).__name__ for m in model.modules()}
    missing = [n for n in names if n not in present]
    if missing:
        import difflib
        classes = module_classes(model)
        close = difflib.get_close_matches(missing[0], classes, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"parallel.shard_modules: {', '.join(missing)} not in {type(model).__name__}{hint}; "
                          f"its classes: {', '.join(classes)}")
    return _outermost(model, set(names))


def module_classes(model: nn.Module) -> list[str]:
    """Class names of the submodules that hold parameters: composite ones (block candidates)
    first, most repeated first, then single layers."""
    counts = Counter(type(m).__name__ for m in model.modules() if _has_params(m) and m is not model
                     and not isinstance(m, (nn.ModuleList, nn.ModuleDict)))
    composite = {type(m).__name__ for m in model.modules() if any(True for _ in m.children())}
    ranked = sorted(counts.items(), key=lambda kv: (kv[0] not in composite, -kv[1]))
    return [name for name, _ in ranked]


def _outermost(model: nn.Module, classes: set[str]) -> list[nn.Module]:
    out: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if type(child).__name__ in classes and _has_params(child):
                out.append(child)
            else:
                visit(child)

    visit(model)
    return out


def _repeated_members(model: nn.Module) -> list[nn.Module]:
    """Members of every ModuleList (outermost) whose two or more composite members share one class."""
    out: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            # composite members only: a list of bare layers (a recommender's embedding tables)
            # is a set of tables, each its own unit by the top-level rule below
            if isinstance(child, nn.ModuleList) and len(child) > 1 and _one_class(child) \
                    and _has_params(child) and any(True for _ in child[0].children()):
                out.extend(child)
            else:
                visit(child)

    visit(model)
    return out


def _one_class(members: Iterable[nn.Module]) -> bool:
    return len({type(m) for m in members}) == 1


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())
