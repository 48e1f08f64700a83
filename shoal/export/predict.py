"""Batch inference in shards: `shoal predict RUN_DIR --data ... --out DIR --nproc N`.

The rows are cut into parts of `part_rows` (a size that does not depend on N, so the
output is the same for any number of workers); the parts still missing from `--out` are
dealt round-robin to N worker processes, each of which consolidates the model itself and
writes each of its parts as `part-NNNNN.parquet`, under a temporary name renamed into place
when complete. A rerun after a kill finds the finished parts and computes only the rest.
When every part is there, `index.json` lists them (written last, also by rename).

Columns of a part: `id` (int64); for a classifier `prediction` (the likeliest class),
`score` (the probability of class 1 for two classes, else of the predicted class) and
`probabilities` (one per class); for a regression model `prediction` (the output).
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import queue
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from shoal.config import USER_ERROR, ConfigError
from shoal.export.consolidate import Located, consolidate, locate
from shoal.export.rows import check_rows, classifies_text, open_rows, score_rows
from shoal.runtime.env import launcher_environment, thread_budget
from shoal.runtime.protocol import LAUNCHER_PID_ENV, LOCAL_WORKERS_ENV

JOB_FILE = "job.json"
INDEX_FILE = "index.json"


@dataclass(frozen=True)
class Job:
    """What a prediction folder holds; a rerun must ask for the same, or write elsewhere."""

    run_dir: str
    checkpoint: str
    data: list[str]
    rows: int
    part_rows: int

    @property
    def parts(self) -> int:
        return math.ceil(self.rows / self.part_rows)


def part_name(part: int) -> str:
    return f"part-{part:05d}.parquet"


def output_columns(outputs: torch.Tensor, kind: str) -> dict[str, np.ndarray]:
    if kind == "regression":
        values = outputs.float().numpy()
        return {"prediction": values[:, 0] if values.shape[1] == 1 else list(values)}
    probs = torch.softmax(outputs.float(), dim=-1)
    prediction = probs.argmax(dim=-1)
    score = probs[:, 1] if probs.shape[1] == 2 else probs.gather(1, prediction[:, None])[:, 0]
    return {"prediction": prediction.numpy(), "score": score.numpy(), "probabilities": probs.numpy()}


def _table(ids: np.ndarray, outputs: torch.Tensor, kind: str):
    import pyarrow as pa
    arrays = {"id": pa.array(ids, pa.int64())}
    for name, values in output_columns(outputs, kind).items():
        if isinstance(values, np.ndarray) and values.ndim == 2:  # one value per class: a fixed-size list
            arrays[name] = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])
        else:
            arrays[name] = pa.array(values)
    return pa.table(arrays)


def check_ids(x: torch.Tensor, ids: np.ndarray, spec, columns: list[str]) -> None:
    """DLRM rows carry one id per embedding table after the dense features; each must index its table."""
    tables = getattr(spec, "table_sizes", ())
    dense = spec.in_features - len(tables)
    for i, size in enumerate(tables):
        values = x[:, dense + i]
        bad = ((values < 0) | (values >= size) | (values != values.round())).nonzero()
        if len(bad):
            row = int(bad[0, 0])
            raise ConfigError(f"--data: row {int(ids[row])}, column {columns[dense + i]}: {values[row].item():g} is "
                              f"not an id of table {i} (0 to {size - 1})")


def score_parts(found: Located, job: Job, parts: list[int], out: Path, batch_size: int, report) -> None:
    """Score `parts` of the job's rows into part files; `report(rows)` after each batch."""
    import pyarrow.parquet as pq
    loaded = consolidate(found, progress=False)
    rows = open_rows(job.data, found.cfg)
    kind = "regression" if found.spec.kind == "regression" else "classes"
    for part in parts:
        start, stop = part * job.part_rows, min((part + 1) * job.part_rows, job.rows)
        ids, outputs = [], []
        for begin in range(start, stop, batch_size):
            batch_ids, x = rows.read(begin, min(begin + batch_size, stop))
            check_ids(x, batch_ids, found.spec, rows.columns)
            with torch.inference_mode():
                outputs.append(score_rows(loaded.model, x, found.spec))
            ids.append(batch_ids)
            report(len(batch_ids))
        tmp = out / f".{part_name(part)}.tmp-{os.getpid()}"
        pq.write_table(_table(np.concatenate(ids), torch.cat(outputs), kind), tmp)
        os.replace(tmp, out / part_name(part))  # the part exists whole, or not at all


def _worker(found: Located, job: Job, parts: list[int], out: str, batch_size: int, threads: int,
            progress: mp.Queue) -> None:
    from shoal.runtime.env import die_with_launcher
    die_with_launcher()  # a killed `shoal predict` takes its workers with it
    torch.set_num_threads(threads)
    try:
        score_parts(found, job, parts, Path(out), batch_size, progress.put)
    except ConfigError as err:
        print(f"shoal: error: {err}", file=sys.stderr)
        raise SystemExit(USER_ERROR) from None


def _prepare(out: Path, job: Job) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".part-*.tmp-*"):  # a part a killed worker was writing
        stale.unlink()
    path = out / JOB_FILE
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved != asdict(job):
            changed = next(k for k in asdict(job) if saved.get(k) != asdict(job)[k])
            raise ConfigError(f"--out {out} holds predictions of another job ({changed}: {saved.get(changed)!r}, "
                              f"now {asdict(job)[changed]!r}); choose another --out or delete it")
    else:
        tmp = out / f".{JOB_FILE}.tmp"
        tmp.write_text(json.dumps(asdict(job), indent=1))
        os.replace(tmp, path)


class Progress:
    """Rows done, rows/s and ETA: a rich bar on a terminal, a line per ~10% otherwise."""

    def __init__(self, total: int, done: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn
        self.live = sys.stderr.isatty()
        self.total, self.done, self.next_line = total, done, done + total // 10
        self.bar = Bar(TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"),
                       TextColumn("{task.fields[rate]:,.0f} rows/s"), TimeRemainingColumn(), disable=not self.live)
        self.task = self.bar.add_task("rows", total=total, completed=done, rate=0.0)
        self.fresh, self.first = 0, None  # rows/s counts from the first batch, not from worker start-up

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        self.bar.__exit__(*exc)

    def advance(self, rows: int) -> None:
        self.done += rows
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        else:
            self.fresh += rows
        rate = self.fresh / (now - self.first) if now > self.first else 0.0
        self.bar.update(self.task, completed=self.done, rate=rate)
        if not self.live and (self.done >= self.next_line or self.done == self.total):
            self.next_line += max(1, self.total // 10)
            eta = (self.total - self.done) / rate if rate else float("nan")
            print(f"predict: {self.done}/{self.total} rows, {rate:,.0f} rows/s, ETA {eta:.0f} s", file=sys.stderr)


def _run_workers(found: Located, job: Job, pending: list[int], out: Path, nproc: int, batch_size: int,
                 threads: int, bar: Progress) -> None:
    ctx = mp.get_context("spawn")  # a fresh interpreter: no forked torch thread pools
    progress = ctx.Queue()
    workers = [ctx.Process(target=_worker, args=(found, job, pending[w::nproc], str(out), batch_size, threads,
                                                 progress), daemon=True)
               for w in range(nproc) if pending[w::nproc]]
    with launcher_environment(**{LAUNCHER_PID_ENV: str(os.getpid())}):  # read by die_with_launcher in each worker
        for worker in workers:
            worker.start()
    try:
        while any(w.is_alive() for w in workers) or not progress.empty():
            try:
                bar.advance(progress.get(timeout=0.2))
            except queue.Empty:
                if any(w.exitcode not in (None, 0) for w in workers):
                    break
    finally:
        for worker in workers:
            if worker.is_alive() and any(w.exitcode not in (None, 0) for w in workers):
                worker.terminate()
            worker.join()
    failed = [w for w in workers if w.exitcode != 0]
    if failed:
        if failed[0].exitcode == USER_ERROR:
            raise SystemExit(USER_ERROR)  # the worker printed its one-line error
        raise RuntimeError(f"a predict worker exited with code {failed[0].exitcode}; finished parts are kept, "
                           f"rerun the same command to continue")


def predict(run_dir: Path, data: list[str], out: Path, *, nproc: int = 1, step: int | None = None,
            batch_size: int = 1024, part_rows: int = 65536, threads: int = 0) -> dict:
    """Score every row of `data` with the run's model into Parquet parts under `out`; the index.
    `threads`: torch threads per worker; 0 shares this host's cores among the `nproc` workers."""
    if nproc < 1 or batch_size < 1 or part_rows < 1 or threads < 0:
        raise ConfigError("--nproc, --batch-size and --part-rows must be at least 1, --threads at least 0")
    threads = threads or thread_budget(0, {LOCAL_WORKERS_ENV: str(nproc)})
    found = locate(run_dir, step)
    rows = open_rows(data, found.cfg)
    check_rows(rows, found.spec, text_classifier=classifies_text(found.cfg))  # before any worker starts
    job = Job(str(Path(run_dir).resolve()), str(Path(found.source).resolve()), list(data), len(rows), part_rows)
    out = Path(out)
    _prepare(out, job)
    pending = [p for p in range(job.parts) if not (out / part_name(p)).is_file()]
    done_rows = sum(min(job.part_rows, job.rows - p * job.part_rows) for p in range(job.parts) if p not in pending)
    with Progress(job.rows, done_rows) as bar:
        if pending and nproc == 1:
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                score_parts(found, job, pending, out, batch_size, bar.advance)
            finally:
                torch.set_num_threads(before)
        elif pending:
            _run_workers(found, job, pending, out, nproc, batch_size, threads, bar)
    parts = [{"file": part_name(p), "first_row": p * job.part_rows,
              "rows": min(job.part_rows, job.rows - p * job.part_rows)} for p in range(job.parts)]
    missing = [p["file"] for p in parts if not (out / p["file"]).is_file()]
    if missing:
        raise RuntimeError(f"{len(missing)} parts missing after the workers finished, e.g. {missing[0]}")
    index = {"rows": job.rows, "run_dir": job.run_dir, "checkpoint": job.checkpoint, "step": found.step,
             "data": job.data, "parts": parts}
    tmp = out / f".{INDEX_FILE}.tmp"
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, out / INDEX_FILE)
    return index
