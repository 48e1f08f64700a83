"""MLflow and Weights & Biases beside metrics.jsonl and TensorBoard, through their own libraries.

Both get what metrics.jsonl gets from the logging worker: every training record (sampled
every `log.every` steps, as TensorBoard is), validation, the per-rank timing windows and the
events, plus the whole config. Under fault tolerance the logging worker can change mid-run;
the run's id is kept in the run directory (`mlflow_run_id`, `wandb_run_id`), so a worker that
takes over, or a resumed run, continues the same MLflow or W&B run.

- MLflow (`log.mlflow = true`, extra `shoal[mlflow]`, which is `mlflow-skinny`: the client
  without the server's pins on pyarrow and python-dateutil, which clash with this project's):
  the tracking URI `log.mlflow_uri` (a tracking server, a database), by default the local
  file store `<log.dir>/mlruns`. MLflow 3 keeps that store in maintenance mode and refuses it
  unless MLFLOW_ALLOW_FILE_STORE=true, which Shoal sets for a file store (and says so).
  Metrics are named `<kind>/<field>` (`train/loss`, `eval/val_loss`, `ranks/compute_max`);
  each event adds 1 to the metric `events/<name>` at its step and all of them are stored as
  the artifact `events.json` when the run ends.
- W&B (`log.wandb = true`, extra `shoal[wandb]`): `log.wandb_mode = "offline"` (the
  default) writes `<run dir>/wandb/` with no network; `wandb sync` uploads it later.
  Metrics go against the custom x-axis `step` (events may arrive for earlier steps, which
  W&B's own step counter refuses); events are counted the same way and listed in the run
  summary.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any

from shoal.config import ConfigError

log = logging.getLogger("shoal")


def _numbers(record: dict[str, Any]) -> dict[str, float]:
    kind = record.get("kind", "train")
    return {f"{kind}/{k}": float(v) for k, v in record.items()
            if k not in ("step", "time", "kind") and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _missing(package: str, extra: str) -> ConfigError:
    return ConfigError(f"log.{extra} = true needs the {package} package: pip install 'shoal[{extra}]'")


class MlflowLogger:
    def __init__(self, run_dir: Path, config: dict[str, Any], *, uri: str, experiment: str):
        try:
            import mlflow
        except ImportError:
            raise _missing("mlflow", "mlflow") from None
        if uri.startswith("file:") and os.environ.get("MLFLOW_ALLOW_FILE_STORE") != "true":
            log.info("MLflow: a local file store (%s); MLFLOW_ALLOW_FILE_STORE=true lets MLflow 3 use it", uri)
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
        from mlflow.entities import RunStatus
        self.mlflow, self.run_dir = mlflow, Path(run_dir)
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        id_file = self.run_dir / "mlflow_run_id"
        self.events: list[dict] = []
        if id_file.is_file():  # a worker taking over the log, or a resumed run
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            return
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        run = self.client.create_run(experiment_id, run_name=self.run_dir.name,
                                     tags={"shoal.run_dir": str(self.run_dir.resolve())})
        self.run_id = run.info.run_id
        id_file.write_text(self.run_id)
        params = [mlflow.entities.Param(k, str(v)[:6000]) for k, v in _flat(config).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[start:start + 100])
        self.client.log_dict(self.run_id, config, "config.json")
        log.info("MLflow: run %s in experiment '%s' at %s", self.run_id, experiment, uri)

    def log(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric
        step, stamp = int(record.get("step", 0)), int(record.get("time", 0) * 1000)
        if record.get("kind") == "event":
            self.events.append(record)
            count = sum(e["event"] == record["event"] for e in self.events)
            metrics = [Metric(f"events/{record['event']}", count, stamp, step)]
        else:
            metrics = [Metric(key, value, stamp, step) for key, value in _numbers(record).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        if self.events:
            self.client.log_dict(self.run_id, self.events, "events.json")
        self.client.set_terminated(self.run_id)


class WandbLogger:
    def __init__(self, run_dir: Path, config: dict[str, Any], *, mode: str, project: str):
        try:
            import wandb
        except ImportError:
            raise _missing("wandb", "wandb") from None
        run_dir = Path(run_dir)
        id_file = run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id)
        self.run = wandb.init(project=project, name=run_dir.name, id=run_id, resume="allow", dir=str(run_dir),
                              mode=mode, config=config, reinit="create_new",
                              settings=wandb.Settings(console="off", quiet=True))
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        self.events: list[dict] = []
        log.info("W&B: run %s (%s) in %s", run_id, mode, self.run.dir)

    def log(self, record: dict[str, Any]) -> None:
        step = int(record.get("step", 0))
        if record.get("kind") == "event":
            self.events.append(record)
            count = sum(e["event"] == record["event"] for e in self.events)
            self.run.log({f"events/{record['event']}": count, "step": step})
        else:
            self.run.log({**_numbers(record), "step": step})

    def close(self) -> None:
        if self.events:
            self.run.summary["events"] = json.dumps(self.events)
        self.run.finish()


def open_loggers(cfg, run_dir: Path) -> list:
    """The ecosystem loggers `cfg.log` asks for (none by default)."""
    from shoal.config import to_dict
    config, loggers = to_dict(cfg), []
    if cfg.log.mlflow:
        uri = cfg.log.mlflow_uri or (Path(cfg.log.dir) / "mlruns").resolve().as_uri()
        loggers.append(MlflowLogger(run_dir, config, uri=uri, experiment=cfg.log.name or "shoal"))
    if cfg.log.wandb:
        loggers.append(WandbLogger(run_dir, config, mode=cfg.log.wandb_mode, project=cfg.log.wandb_project))
    return loggers
