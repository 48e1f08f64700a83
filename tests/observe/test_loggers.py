"""MLflow and W&B runs written by a real `shoal run`, read back through each library's own
reader: `mlflow.MlflowClient` for MLflow; for W&B's offline run file (which `wandb.Api`
cannot open and for which wandb ships no Python reader), the LevelDB-log framing that wandb
documents, each record parsed as wandb's own `wandb_internal_pb2.Record` protobuf."""

from __future__ import annotations

import json
import os
import struct
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, SHOAL, metric_records, train_losses

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

RUN = ["model.name=mlp", "data.source=synthetic", "train.batch_size=32", "train.steps=20", "train.eval_every=10",
       "train.warmup_steps=2", "launch.nproc=2", "checkpoint.every=10", "log.every=5", "log.progress=off",
       "log.tensorboard=false"]


def shoal_run(cwd: Path, *extra: str) -> Path:
    out = subprocess.run([SHOAL, "run", *RUN, *extra], cwd=cwd, capture_output=True, text=True, timeout=200,
                         stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT), "WANDB_SILENT": "true"})
    assert out.returncode == 0, out.stderr[-3000:]
    return cwd / "runs" / "quickstart"


def test_mlflow_run_reads_back_through_mlflow_client(tmp_path):
    mlflow = pytest.importorskip("mlflow", reason="mlflow is not installed (pip install 'shoal[mlflow]')")
    run_dir = shoal_run(tmp_path, "log.mlflow=true")
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # MLflow 3 keeps the local file store in maintenance mode
    client = mlflow.MlflowClient(tracking_uri=(tmp_path / "runs" / "mlruns").as_uri())
    run = client.get_run((run_dir / "mlflow_run_id").read_text().strip())
    assert run.info.status == "FINISHED" and run.info.run_name == "quickstart"
    assert run.data.params["train.steps"] == "20" and run.data.params["model.name"] == "mlp"
    loss = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in loss] == [5, 10, 15, 20]  # sampled every log.every steps, as TensorBoard is
    by_step = train_losses(run_dir)
    assert all(abs(m.value - by_step[m.step]) < 1e-9 for m in loss)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/val_loss")] == [10, 20]
    assert client.get_metric_history(run.info.run_id, "ranks/compute_max")
    checkpoints = client.get_metric_history(run.info.run_id, "events/checkpoint")
    assert [(m.step, m.value) for m in checkpoints] == [(10, 1.0), (20, 2.0)]
    events = json.loads(Path(client.download_artifacts(run.info.run_id, "events.json", str(tmp_path))).read_text())
    # every event the run recorded (a straggler too, when the machine is busy enough to make one), in order
    recorded = [e["event"] for e in metric_records(run_dir, "event")]
    assert [e["event"] for e in events] == recorded and recorded.count("checkpoint") == 2


def wandb_records(path: Path) -> list:
    """Every record of an offline .wandb file: a 7-byte header (':W&B', magic, version), then
    32 KiB blocks of chunks (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2
    data, block, pos, pending, records = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_wandb_offline_run_reads_back_from_its_run_file(tmp_path):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install 'shoal[wandb]')")
    run_dir = shoal_run(tmp_path, "log.wandb=true")
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    [path] = list((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    records = wandb_records(path)
    # a key with '/' travels split, in nested_key
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    losses = {h["step"]: h["train/loss"] for h in history if "train/loss" in h}
    assert sorted(losses) == [5, 10, 15, 20]
    logged = train_losses(run_dir)
    assert all(abs(value - logged[step]) < 1e-6 for step, value in losses.items())
    assert [h["step"] for h in history if "eval/val_loss" in h] == [10, 20]
    assert [h["events/checkpoint"] for h in history if "events/checkpoint" in h] == [1, 2]
    [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert run.run_id == run_id and config["train"]["steps"] == 20 and config["model"]["name"] == "mlp"
