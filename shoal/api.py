"""Shoal from Python: `shoal.train(config, model=..., data=..., loss=...)`.

    import shoal

    def build_model(spec): ...          # module level: workers import it by name
    def build_data(): ...               # a torch Dataset (see docs/data.md, data.factory)
    def pad(items): ...                 # optional: a list of items -> one batch (data.collate)

    if __name__ == "__main__":          # workers import this file; the guard keeps them from training again
        result = shoal.train(shoal.Config(), model=build_model, data=build_data)
        print(result.run_dir, result.metrics)

Where it runs: when this process is already a worker of a job (torchrun, srun or Ray set
RANK/WORLD_SIZE or SLURM_PROCID), the worker code runs here, in this process, exactly as
`python -m shoal.worker` would. With `ray=True` (a Ray started for this run) or
`ray="HOST:PORT"` (a running cluster) it trains on `launch.nproc` Ray Train workers, as
`shoal run --ray` does. Otherwise it starts `launch.nproc` local workers the way
`shoal run` does (the same checks, run directory and launcher) and waits for them.

How your functions reach the workers: by name. A function becomes the string
'module:function' in the config (`model.factory`, `data.factory`, `data.collate`, `model.loss`), which every
worker imports. A function defined in the script being run (module `__main__`) is named by
the script's file name, and its folder is put on the workers' PYTHONPATH, so workers import
the script as a module (its `if __name__ == "__main__":` block does not run there). Nothing
is pickled: a worker may be another process, another host or a restarted process, and a
name is all it can be given that it can check and rebuild from; lambdas, closures and
model instances are refused with a message saying so.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal import config as config_module
from shoal.config import USER_ERROR, Config, ConfigError

__all__ = ["TrainResult", "train"]


@dataclass
class TrainResult:
    """What a finished run left: its directory and its last metrics."""

    run_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    """The last train record of metrics.jsonl (step, loss, throughput...) plus the last
    validation loss as `val_loss` when there was an evaluation."""


def train(config: Config | str | Path | None = None, *, model: Any = None, data: Any = None, loss: Any = None,
          collate: Any = None, overrides: list[str] | tuple[str, ...] = (), resume: str | None = None,
          ray: bool | str = False, verbose: bool = False) -> TrainResult:
    """Train as `shoal run` does and return the run directory and final metrics.

    `config`: a Config, a TOML path, or None for the defaults. `model`: a function
    spec -> nn.Module (a Hugging Face PreTrainedModel is fine), its 'module:function' name,
    or the folder of a saved Hugging Face model. `data`: a function returning a torch
    Dataset (data.factory) or its name. `collate`: a function turning a list of the dataset's
    items into a batch (data.collate: pads samples of different lengths) or its name. `loss`: a function (output, batch) -> scalar, its
    name, or "model" for the model's own loss. `overrides`: 'section.key=value' strings.
    `resume`: a run directory, or "latest" (as `--resume`). `ray`: True, or a Ray address
    (HOST:PORT of the head's GCS, or ray://HOST:PORT), to train on Ray workers.
    """
    cfg = _config(config, overrides)
    if model is not None:
        if isinstance(model, (str, Path)) and ":" not in str(model):
            cfg.model.hf, cfg.model.factory = str(model), ""
        else:
            cfg.model.factory, cfg.model.hf = _name_of(model, "model"), ""
    if data is not None:
        cfg.data.factory = _name_of(data, "data")
    if collate is not None:
        cfg.data.collate = _name_of(collate, "collate")
    if loss is not None:
        cfg.model.loss = loss if loss == "model" else _name_of(loss, "loss")
    config_module.validate(cfg)
    if ray:
        return _launch_on_ray(cfg, None if ray is True else str(ray), resume)
    if _in_worker():
        return _train_here(cfg, resume, verbose)
    return _launch(cfg, resume, verbose)


def _config(config: Config | str | Path | None, overrides) -> Config:
    if isinstance(config, Config):
        cfg = config_module.from_dict(config_module.to_dict(config))  # a copy: the caller's stays as it was
        cfg = config_module.apply_overrides(cfg, list(overrides))
        cfg.log.name = cfg.log.name or "shoal"
        return cfg
    return config_module.load(config, list(overrides))


def _name_of(obj: Any, what: str) -> str:
    """'module:function' for a function the workers can import (see the module docstring)."""
    if isinstance(obj, str):
        if ":" not in obj:
            raise ConfigError(f"{what}= '{obj}' must look like 'package.module:function'")
        return obj
    qualname = getattr(obj, "__qualname__", "")
    module = getattr(obj, "__module__", None)
    if not callable(obj) or not module or not qualname:
        raise ConfigError(f"{what}= takes a module-level function (or its 'module:function' name), not a "
                          f"{type(obj).__name__}: workers are separate processes and build their own from a name")
    if "<" in qualname or "." in qualname:
        raise ConfigError(f"{what}= {qualname} is not a module-level function; workers import functions by name, "
                          f"so define it at the top level of a module or script")
    if module == "__main__":
        main_file = getattr(sys.modules["__main__"], "__file__", None)
        if not main_file:
            raise ConfigError(f"{what}= {qualname} is defined in an interactive session; workers import functions "
                              f"by name, so define it in a file")
        folder, module = str(Path(main_file).resolve().parent), Path(main_file).stem
        # workers import the script as `module`; in this process it is already loaded as __main__
        sys.modules.setdefault(module, sys.modules["__main__"])
        if folder not in sys.path:
            sys.path.insert(0, folder)
        paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
        if folder not in paths:
            os.environ["PYTHONPATH"] = os.pathsep.join([folder, *[p for p in paths if p]])
    return f"{module}:{qualname}"


def _in_worker() -> bool:
    """Started as one worker of a job (torchrun, srun, Ray's torch trainer, shoal's launcher)."""
    env = os.environ
    return ("RANK" in env and "WORLD_SIZE" in env) or ("SLURM_PROCID" in env and "SLURM_NTASKS" in env)


def _train_here(cfg: Config, resume: str | None, verbose: bool) -> TrainResult:
    from shoal.observe import rundir
    from shoal.worker import train as worker_train
    # every rank must agree on the directory without talking first: the exact name, as for
    # a multi-host launch (checkpoints already there need resume=)
    path = Path(cfg.log.dir) / cfg.log.name if resume else rundir.new_run_dir(cfg, exact=True)
    if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
        (path / "config.toml").write_text(config_module.to_toml(cfg))
    worker_train(cfg, run_dir=str(path), resume=resume and str(path), verbose=verbose)
    return TrainResult(path, final_metrics(path))


def _launch(cfg: Config, resume: str | None, verbose: bool) -> TrainResult:
    # the same steps as `shoal run`: checks, run directory, launcher (shoal/launch/run.py)
    from shoal.launch.run import Invocation, start_local
    code, run_dir = start_local(cfg, Invocation(command="run", resume=resume, verbose=verbose))
    return _result(code, run_dir, f"worker logs in {run_dir / 'logs'}")


def _launch_on_ray(cfg: Config, address: str | None, resume: str | None) -> TrainResult:
    from shoal.launch.run import start_on_ray
    code, run_dir = start_on_ray(cfg, address, resume)  # as `shoal run --ray` does
    return _result(code, run_dir, "Ray's error is printed above")


def _result(code: int, run_dir: Path, where: str) -> TrainResult:
    if code == USER_ERROR:
        raise ConfigError(f"a worker refused the config; {where}")
    if code:
        raise RuntimeError(f"training failed (exit code {code}); {where}")
    return TrainResult(run_dir, final_metrics(run_dir))


def final_metrics(run_dir: Path) -> dict[str, Any]:
    """The last train record of `run_dir`'s metrics.jsonl, with the last val_loss added."""
    path = Path(run_dir) / "metrics.jsonl"
    out: dict[str, Any] = {}
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "train":
            out.update({k: v for k, v in record.items() if k != "kind"})
        elif record.get("kind") == "eval":
            out["val_loss"] = record["val_loss"]
    return out


