"""Run directories: `<log.dir>/<log.name>[-N]/` holding config, metrics, checkpoints, logs."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

from shoal.config import Config, ConfigError, to_dict
from shoal.runtime.checkpoint import latest_checkpoint, read_meta

# Sections whose change makes a checkpoint unusable; [parallel] may change (checkpoints reshard).
COMPATIBLE_SECTIONS = ("model",)
COMPATIBLE_DATA_KEYS = ("source", "seq_len", "features", "classes")


def checkpoint_folder(cfg: Config, run_dir: Path) -> Path:
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else Path(run_dir) / "checkpoints"


def runs_named(cfg: Config) -> list[Path]:
    """Existing run directories for this run name, oldest first (name, name-1, name-2, ...)."""
    root = Path(cfg.log.dir)
    pattern = re.compile(re.escape(cfg.log.name) + r"(-\d+)?")
    found = [p for p in root.glob(f"{cfg.log.name}*") if p.is_dir() and pattern.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(p.name.rsplit("-", 1)[1]) if p.name != cfg.log.name else 0)


def new_run_dir(cfg: Config, exact: bool = False) -> Path:
    """A fresh run directory; an existing one of the same name is never reused (`-1`, `-2`, ...),
    unless `exact` (multi-host launch, where every host must agree on the name)."""
    root = Path(cfg.log.dir)
    path = root / cfg.log.name
    if exact:
        if latest_checkpoint(checkpoint_folder(cfg, path)) is not None:
            raise ConfigError(f"{path} already holds checkpoints: pass --resume to continue it, "
                              f"or log.name=<new name> for a new run")
    else:
        existing = runs_named(cfg)
        if existing:
            last = existing[-1].name
            number = int(last.rsplit("-", 1)[1]) + 1 if last != cfg.log.name else 1
            path = root / f"{cfg.log.name}-{number}"
    (path / "logs").mkdir(parents=True, exist_ok=True)
    return path


def find_resume(cfg: Config, requested: str) -> tuple[Path, Path]:
    """(run dir, checkpoint) to resume: `requested` is a run directory, or 'latest' for the
    newest run of this name. Raises ConfigError when there is nothing compatible."""
    if requested != "latest":
        run_dir = Path(requested)
        if not run_dir.is_dir():
            raise ConfigError(f"--resume: {run_dir} is not a directory")
    else:
        candidates = [p for p in runs_named(cfg) if latest_checkpoint(checkpoint_folder(cfg, p))]
        if not candidates:
            raise ConfigError(f"--resume: no checkpoint found for run '{cfg.log.name}' under {cfg.log.dir}/")
        run_dir = candidates[-1]
    checkpoint = latest_checkpoint(checkpoint_folder(cfg, run_dir))
    if checkpoint is None:
        raise ConfigError(f"--resume: {run_dir} has no complete checkpoint")
    check_compatible(cfg, read_meta(checkpoint), checkpoint)
    return run_dir, checkpoint


def checkpoint_meta(cfg: Config) -> dict:
    from shoal.data import data_fingerprint
    values = to_dict(cfg)
    return {"config": {**{s: values[s] for s in COMPATIBLE_SECTIONS},
                       "data": {k: values["data"][k] for k in COMPATIBLE_DATA_KEYS}},
            "data_fingerprint": data_fingerprint(cfg.data)}


def check_compatible(cfg: Config, meta: dict, where: Path) -> None:
    saved = meta.get("config", {})
    for section, values in checkpoint_meta(cfg)["config"].items():
        for key, value in values.items():
            old = saved.get(section, {}).get(key, value)
            if old != value:
                raise ConfigError(f"--resume: checkpoint {where} was saved with {section}.{key} = {old!r}, "
                                  f"but the config now says {value!r}")
    old_data, new_data = meta.get("data_fingerprint", ""), checkpoint_meta(cfg)["data_fingerprint"]
    if old_data != new_data:
        raise ConfigError(f"--resume: checkpoint {where} was made on data {old_data or 'named by the config'}, "
                          f"but data.path {cfg.data.path} holds {new_data or 'other data'}")


def log_to_run(run_dir: Path, role: str, rank: int, to_terminal: bool) -> None:
    """This process's log lines to `<run dir>/logs/<role><rank>.log`, labelled `[<role> <rank>]`, and
    to stdout too when `to_terminal` (under the launcher, local rank 0's stdout is the terminal and
    its stderr a file)."""
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    handlers: list[logging.Handler] = [logging.FileHandler(run_dir / "logs" / f"{role}{rank}.log")]
    if to_terminal:
        handlers.append(logging.StreamHandler(sys.stdout))
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True,
                        format=f"%(asctime)s [{role} {rank}] %(message)s", datefmt="%H:%M:%S")
