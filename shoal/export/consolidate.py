"""One model on one process from a run directory, whatever layout trained it.

A run's Distributed Checkpoint (shoal/runtime/checkpoint.py) holds the model under the
state-dict key `model.<fqn>`, where `<fqn>` is the plain model's parameter name under every
layout: DDP's `module.` prefix, FSDP's and TP's DTensor shards and a pipeline stage's pruned
copy all save under the unwrapped names, each rank writing the pieces it holds. DCP
reassembles (reshards) the pieces on load, so rebuilding the plain model from the run's
`config.toml` (`shoal.models.build_model` on the data's `DataSpec`) and loading its state
dict with `no_dist=True` gives the whole model without a process group. Only `model.*` keys
are read: optimizer moments and trainer state stay on disk.

A federated run directory (`shoal fed server`) holds `model.safetensors` instead; it is read
the same way, with the input width taken from the weights (the clients' data decided it).
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from shoal import config as config_module
from shoal.config import Config, ConfigError
from shoal.data.spec import DataSpec
from shoal.runtime.checkpoint import checkpoint_steps
from shoal.observe.rundir import checkpoint_folder

CHUNK_BYTES = 256 << 20
"""Bytes of weights read per DCP load call: the unit the progress bar advances by."""


@dataclass
class LoadedModel:
    """A consolidated model in eval mode, with what it was built from."""

    model: nn.Module
    cfg: Config
    spec: DataSpec
    step: int
    source: Path
    """The checkpoint folder (or federated model file) the weights came from."""


def run_config(run_dir: Path) -> Config:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is not a run directory")
    path = run_dir / "config.toml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} has no config.toml: not a run directory made by `shoal run`")
    return config_module.load(str(path), [])


def find_checkpoint(cfg: Config, run_dir: Path, step: int | None) -> tuple[int, Path]:
    """(step, folder) of the requested complete checkpoint, or of the newest one."""
    folder = checkpoint_folder(cfg, Path(run_dir))
    found = checkpoint_steps(folder)
    if not found:
        raise ConfigError(f"{run_dir} has no complete checkpoint (no step_N folder with meta.json in {folder})")
    if step is None:
        return found[-1]
    for saved_step, path in found:
        if saved_step == step:
            return saved_step, path
    raise ConfigError(f"--step {step}: {run_dir} has no checkpoint of that step; it has steps "
                      f"{', '.join(str(s) for s, _ in found)}")


def data_spec(cfg: Config) -> DataSpec:
    """The DataSpec the run's model was built for (from its [data] section)."""
    from shoal.data import build_dataset
    return build_dataset(cfg.data, cfg.train.seed)[2]


def build(cfg: Config, spec: DataSpec) -> nn.Module:
    from shoal.models import build_model
    torch.manual_seed(cfg.train.seed)  # the same initial weights as the run's (all are overwritten)
    return build_model(cfg.model, spec, folder_weights=False)  # a model.hf folder's weights are replaced too


def _chunks(keys: list[str], sizes: dict[str, int], limit: int) -> list[list[str]]:
    out: list[list[str]] = [[]]
    total = 0
    for key in keys:
        if out[-1] and total + sizes[key] > limit:
            out.append([])
            total = 0
        out[-1].append(key)
        total += sizes[key]
    return out


def load_dcp_weights(model: nn.Module, checkpoint: Path, *, progress: bool = True,
                     chunk_bytes: int = CHUNK_BYTES) -> None:
    """Copy the `model.*` tensors of a DCP checkpoint into `model`'s own tensors, in chunks."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    saved = {key[len("model."):]: meta for key, meta in FileSystemReader(str(checkpoint)).read_metadata()
             .state_dict_metadata.items() if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)}
    state = model.state_dict()
    loaded_storage = {t.untyped_storage().data_ptr() for k, t in state.items() if k in saved}
    # A tied weight (an LM head sharing the embedding) may be saved once, under one name.
    missing = [k for k, t in state.items() if k not in saved and t.untyped_storage().data_ptr() not in loaded_storage]
    if missing:
        raise ConfigError(f"checkpoint {checkpoint} does not hold the model's {missing[0]} ({len(missing)} missing "
                          f"tensors): was it saved by another model config?")
    keys = [k for k in state if k in saved]
    for key in keys:
        if tuple(saved[key].size) != tuple(state[key].shape):
            raise ConfigError(f"checkpoint {checkpoint}: {key} has shape {tuple(saved[key].size)}, the model built "
                              f"from config.toml has {tuple(state[key].shape)}")
    sizes = {k: state[k].numel() * state[k].element_size() for k in keys}
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
    bar = Progress(TextColumn("loading weights"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                   transient=True, disable=not (progress and sys.stderr.isatty()))
    with bar, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")  # no_dist is the intent
        task = bar.add_task("load", total=sum(sizes.values()))
        for chunk in _chunks(keys, sizes, chunk_bytes):
            dcp.load({"model": {k: state[k] for k in chunk}}, checkpoint_id=str(checkpoint), no_dist=True)
            bar.advance(task, sum(sizes[k] for k in chunk))


def _federated_spec(cfg: Config, weights: dict[str, torch.Tensor], path: Path) -> DataSpec:
    """The spec of a federated MLP: input width from its first layer, classes from its last."""
    if cfg.model.name != "mlp" or cfg.model.factory:
        raise ConfigError(f"{path}: only the reference mlp of a federated run can be rebuilt (model.name = "
                          f"'{cfg.model.name}')")
    layers = sorted((int(k.split(".")[0]), t) for k, t in weights.items() if k.endswith(".weight"))
    return DataSpec(kind="classes", in_features=layers[0][1].shape[1], num_classes=layers[-1][1].shape[0])


@dataclass
class Located:
    """What a run's model is, and where its weights are, before any weight is read."""

    cfg: Config
    spec: DataSpec
    step: int
    source: Path
    federated: bool


def locate(run_dir: Path, step: int | None = None) -> Located:
    """The run's config, its model's DataSpec and the checkpoint `step` (default: the newest)."""
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    federated = run_dir / "model.safetensors"
    if federated.is_file() and not checkpoint_steps(checkpoint_folder(cfg, run_dir)):
        if step is not None:
            raise ConfigError(f"--step {step}: {run_dir} is a federated run; it keeps only its final model")
        from safetensors import safe_open
        with safe_open(str(federated), "pt") as f:
            shapes = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
        return Located(cfg, _federated_spec(cfg, shapes, federated), -1, federated, True)
    saved_step, path = find_checkpoint(cfg, run_dir, step)
    return Located(cfg, data_spec(cfg), saved_step, path, False)


def consolidate(run_dir: Path | Located, step: int | None = None, *, progress: bool = True) -> LoadedModel:
    """The model of `run_dir`'s checkpoint `step` (default: the newest), whole, on the CPU, in eval mode."""
    found = run_dir if isinstance(run_dir, Located) else locate(run_dir, step)
    model = build(found.cfg, found.spec)
    if found.federated:
        from safetensors.torch import load_file
        model.load_state_dict(load_file(str(found.source)))
    else:
        load_dcp_weights(model, found.source, progress=progress)
    return LoadedModel(model.eval(), found.cfg, found.spec, found.step, found.source)


def example_inputs(loaded: LoadedModel, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A batch the model accepts: token ids, feature rows, or click rows with valid ids."""
    g = torch.Generator().manual_seed(seed)
    spec = loaded.spec
    if spec.kind == "tokens":
        return torch.randint(0, spec.vocab_size, (batch, spec.seq_len), generator=g)
    x = torch.randn(batch, spec.in_features, generator=g)
    tables = getattr(spec, "table_sizes", ())
    if tables:  # DLRM rows: dense features, then one id per table (stored as floats)
        dense = spec.in_features - len(tables)
        for i, size in enumerate(tables):
            x[:, dense + i] = torch.randint(0, size, (batch,), generator=g).float()
    return x


def is_hf_model(model: nn.Module) -> bool:
    """A Hugging Face `PreTrainedModel` (checked without importing transformers when unused)."""
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)
