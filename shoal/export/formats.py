"""Writing a consolidated model in a deployable format.

- `safetensors`: the weights in one file, with the run's config (TOML) and step in its
  metadata, so `shoal.models.build_model` can rebuild the module around them.
- `hf`: a Hugging Face folder (`config.json` + sharded safetensors) by `save_pretrained`, for
  `from_pretrained`; only for models that are a `transformers.PreTrainedModel`.
- `torch-export`: a `.pt2` ExportedProgram (`torch.export`) whose batch dimension is dynamic.
- `onnx`: an ONNX graph (`torch.onnx.export`, the dynamo exporter) with a dynamic batch
  dimension, which `onnxruntime` runs.

Every format is written under a temporary name beside `--out` and renamed into place at the
end, so a failure or a kill leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from shoal import config as config_module
from shoal.config import ConfigError
from shoal.export.consolidate import LoadedModel, example_inputs, is_hf_model

FORMATS = ("safetensors", "hf", "torch-export", "onnx")


class LogitsOnly(nn.Module):
    """A Hugging Face model seen as tokens -> logits, the shape a graph exporter needs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits


def _graph_module(loaded: LoadedModel) -> nn.Module:
    return LogitsOnly(loaded.model) if is_hf_model(loaded.model) else loaded.model


def _why(err: BaseException) -> str:
    """One line saying why a tracer refused the model."""
    text = str(err).strip()
    first = text.splitlines()[0] if text else type(err).__name__
    if "data-dependent" in text or "DataDependent" in type(err).__name__ + text:
        return f"it has data-dependent control flow (a branch or shape that depends on tensor values): {first}"
    return first[:300]


def write_atomically(out: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` for a temporary path beside `out`, then rename it to `out`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{os.getpid()}-{out.name}"  # keeps the suffix some writers look at
    try:
        write(tmp)
        if out.is_dir() and not out.is_symlink():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
    return out


def export_safetensors(loaded: LoadedModel, tmp: Path) -> None:
    from safetensors.torch import save_model
    metadata = {"shoal_config": config_module.to_toml(loaded.cfg), "step": str(loaded.step),
                "format": "pt"}
    save_model(loaded.model, str(tmp), metadata=metadata)  # drops the duplicate names of tied weights


def export_hf(loaded: LoadedModel, tmp: Path) -> None:
    loaded.model.save_pretrained(str(tmp), max_shard_size="500MB")


@contextlib.contextmanager
def _quiet_torch():
    """Torch's tracers log each refusal at length (graphs, guards) and warn about torchvision
    ops no model here uses; the user gets the one-line reason instead."""
    names = [name for name in logging.root.manager.loggerDict if name == "torch" or name.startswith("torch.")]
    saved = [(logging.getLogger(name), logging.getLogger(name).level) for name in names]
    for log, _ in saved:
        log.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        for log, level in saved:
            log.setLevel(level)


def _batch_dim():
    return torch.export.Dim("batch", min=1, max=1 << 20)


def export_program(loaded: LoadedModel) -> torch.export.ExportedProgram:
    """The model as an ExportedProgram with a dynamic batch dimension; ConfigError when it cannot be."""
    module = _graph_module(loaded)
    try:
        with _quiet_torch():
            return torch.export.export(module, (example_inputs(loaded),), dynamic_shapes=({0: _batch_dim()},))
    except Exception as err:  # noqa: BLE001 - the tracer's many error types all mean "this model cannot"
        raise ConfigError(f"--format torch-export: {type(loaded.model).__name__} cannot be exported because "
                          f"{_why(err)}") from None


def export_torch(loaded: LoadedModel, tmp: Path) -> None:
    torch.export.save(export_program(loaded), str(tmp))


def export_onnx(loaded: LoadedModel, tmp: Path) -> None:
    program = export_program(loaded)  # the same tracer: its refusal carries the clearest reason
    try:
        # The exporter also prints a line per pass.
        with _quiet_torch():
            torch.onnx.export(program, (example_inputs(loaded),), str(tmp), dynamo=True, external_data=False,
                              input_names=["inputs"], output_names=["outputs"], verbose=False)
    except Exception as err:  # noqa: BLE001
        raise ConfigError(f"--format onnx: {type(loaded.model).__name__} cannot be converted to ONNX: "
                          f"{_why(err)}") from None


def check_format(loaded: LoadedModel, fmt: str) -> None:
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    if fmt == "hf" and not is_hf_model(loaded.model):
        raise ConfigError(f"--format hf: {type(loaded.model).__name__} is not a Hugging Face PreTrainedModel "
                          f"(no config.json to write); use --format safetensors")


def export(loaded: LoadedModel, fmt: str, out: Path) -> Path:
    """Write `loaded` to `out` in format `fmt` (one of FORMATS), atomically."""
    check_format(loaded, fmt)
    writer = {"safetensors": export_safetensors, "hf": export_hf, "torch-export": export_torch,
              "onnx": export_onnx}[fmt]
    return write_atomically(Path(out), lambda tmp: writer(loaded, tmp))
