"""`shoal serve RUN_DIR --port P`: one process answering HTTP/JSON, with micro-batching.

Each request carries a few rows (a transaction to score, say). Request threads of the
standard library's `ThreadingHTTPServer` hand their rows to one batching thread, which
waits for the first request, gathers whatever else arrives within `max_wait_ms` (up to
`max_batch` rows), runs the model once on all of them and hands each request its own slice
of the result: under load, many small requests share one forward pass (the dynamic
batching of inference servers such as Triton and TorchServe).

    POST /predict   {"rows": [[f0, f1, ...], ...]}
                    -> {"prediction": [...], "score": [...], "probabilities": [[...], ...]}
    GET  /health    -> {"status": "ok", "step": N, "features": F}

The server binds 127.0.0.1 unless told otherwise; it has no authentication, so put it
behind your own gateway before exposing it.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from shoal.config import ConfigError
from shoal.export.consolidate import LoadedModel, consolidate
from shoal.export.predict import output_columns
from shoal.export.rows import classifies_text, row_width, score_rows

MAX_BODY = 16 << 20


@dataclass
class Request:
    rows: torch.Tensor
    done: threading.Event = field(default_factory=threading.Event)
    result: dict | None = None
    error: str | None = None


class Batcher:
    """Collects requests' rows into batches for one model, on its own thread."""

    def __init__(self, loaded: LoadedModel, *, max_batch: int = 64, max_wait_ms: float = 2.0):
        self.model, self.kind = loaded.model, "regression" if loaded.spec.kind == "regression" else "classes"
        self.spec = loaded.spec
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000
        self.requests: queue.Queue[Request | None] = queue.Queue()
        self.batch_sizes: list[int] = []
        """Rows of each forward pass, for tests and the benchmark."""
        self.thread = threading.Thread(target=self._loop, name="batcher", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.requests.put(None)
        self.thread.join()

    def submit(self, rows: torch.Tensor) -> dict:
        """Block until the rows are scored; the result columns as lists."""
        request = Request(rows)
        self.requests.put(request)
        request.done.wait()
        if request.error:
            raise RuntimeError(request.error)
        return request.result

    def _gather(self, first: Request) -> list[Request]:
        batch, rows = [first], len(first.rows)
        deadline = time.monotonic() + self.max_wait
        while rows < self.max_batch:
            try:
                request = self.requests.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if request is None:  # stop after this batch
                self.requests.put(None)
                break
            batch.append(request)
            rows += len(request.rows)
        return batch

    def _loop(self) -> None:
        while (first := self.requests.get()) is not None:
            batch = self._gather(first)
            try:
                with torch.inference_mode():
                    outputs = score_rows(self.model, torch.cat([r.rows for r in batch]), self.spec)
                columns = output_columns(outputs, self.kind)
                self.batch_sizes.append(len(outputs))
                start = 0
                for request in batch:
                    stop = start + len(request.rows)
                    request.result = {name: [v.tolist() if hasattr(v, "tolist") else v for v in values[start:stop]]
                                      for name, values in columns.items()}
                    start = stop
            except Exception as err:  # noqa: BLE001 - reported to each waiting request, the server goes on
                for request in batch:
                    request.error = f"{type(err).__name__}: {err}"
            for request in batch:
                request.done.set()


def make_handler(batcher: Batcher, loaded: LoadedModel):
    features = row_width(loaded.spec)

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - the http.server naming
            if self.path == "/health":
                self._reply(200, {"status": "ok", "step": loaded.step, "features": features})
            else:
                self._reply(404, {"error": f"no {self.path}; use POST /predict or GET /health"})

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/predict":
                self._reply(404, {"error": f"no {self.path}; use POST /predict"})
                return
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 < length <= MAX_BODY:
                self._reply(413 if length else 400, {"error": f"body must be 1 to {MAX_BODY} bytes of JSON"})
                return
            try:
                rows = torch.tensor(json.loads(self.rfile.read(length))["rows"], dtype=torch.float32)
            except (ValueError, KeyError, TypeError) as err:
                self._reply(400, {"error": f"body must be {{\"rows\": [[numbers]]}}: {err}"})
                return
            if rows.ndim != 2 or rows.shape[1] != features or not len(rows):
                self._reply(400, {"error": f"rows must be a non-empty list of rows of {features} numbers, got "
                                           f"shape {list(rows.shape)}"})
                return
            try:
                self._reply(200, batcher.submit(rows))
            except RuntimeError as err:
                self._reply(500, {"error": str(err)})

        def log_message(self, format, *args) -> None:  # noqa: A002 - one line per request is too much here
            pass

    return Handler


def make_server(loaded: LoadedModel, host: str = "127.0.0.1", port: int = 0, *, max_batch: int = 64,
                max_wait_ms: float = 2.0) -> tuple[ThreadingHTTPServer, Batcher]:
    """A server (not yet serving) and its started batcher; port 0 picks a free port."""
    if loaded.spec.kind == "tokens" and not classifies_text(loaded.cfg):
        raise ConfigError("shoal serve scores rows of features; this run's model reads text (use shoal generate)")
    batcher = Batcher(loaded, max_batch=max_batch, max_wait_ms=max_wait_ms)
    try:
        server = ThreadingHTTPServer((host, port), make_handler(batcher, loaded))
    except OSError as err:
        raise ConfigError(f"--port {port}: cannot listen on {host}:{port} ({err.strerror})") from None
    server.daemon_threads = True
    batcher.start()
    return server, batcher


def serve(run_dir: Path, *, host: str, port: int, step: int | None, max_batch: int, max_wait_ms: float) -> None:
    loaded = consolidate(Path(run_dir), step)
    server, batcher = make_server(loaded, host, port, max_batch=max_batch, max_wait_ms=max_wait_ms)
    print(f"shoal: serving step {loaded.step} of {run_dir} on http://{host}:{server.server_address[1]} "
          f"(POST /predict, GET /health)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        batcher.stop()
