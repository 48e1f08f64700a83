"""Batch inference and export cost: `shoal predict` against a hand-written loop, and
`shoal export` against the checkpoint's own save time.

1. rows/s of `predict` (the Python API `shoal predict` calls) on 1 and 2 worker processes,
   wall clock from the call to the index (model loading and worker start-up included),
   against a hand-written `torch.no_grad()` loop over the same memory-mapped rows with the
   model already in memory, batch for batch. Goals (issue 15): 1 worker at least 0.95x the
   loop; 2 workers near 2x one (on 2 cores, shared with the system).
2. the time `Checkpointer.save` takes to write the model's checkpoint (one process, with the
   AdamW state a run saves) against the time to consolidate it and write safetensors, and
   torch-export. Goal: export at most 2x the save.
3. `shoal serve` latency on 127.0.0.1: p50/p99 of one-row requests from 1 client, then from
   8 concurrent clients (whose requests the server batches).

    .venv/bin/python benchmarks/inference.py            # full size: 400k rows, a 3x1024 mlp
    .venv/bin/python benchmarks/inference.py --quick    # seconds: a smoke test of the script
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import urllib.request
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from shoal import config as config_module
from shoal.export.consolidate import build, consolidate, data_spec
from shoal.export.formats import export
from shoal.export.predict import predict
from shoal.fault.checkpoint import Checkpointer

SIZES = {"full": {"rows": 400_000, "features": 64, "flavour": "medium", "batch": 1024, "requests": 4000},
         "quick": {"rows": 20_000, "features": 16, "flavour": "debug", "batch": 512, "requests": 400}}


def make_run(root: Path, size: dict) -> tuple[Path, Path, float]:
    """A run directory with a checkpoint of an mlp for the rows; the seconds its save took."""
    data = root / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    np.save(data / "x.npy", rng.normal(size=(size["rows"], size["features"])).astype(np.float32))
    np.save(data / "y.npy", rng.integers(0, 4, size["rows"]))
    cfg = config_module.load(None, ["model.name=mlp", f"model.flavour={size['flavour']}", "data.source=npy",
                                    f"data.path={data}", "log.name=bench"])
    run_dir = root / "bench"
    run_dir.mkdir()
    (run_dir / "config.toml").write_text(config_module.to_toml(cfg))
    model = build(cfg, data_spec(cfg))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.zeros(2, size["features"])).sum().backward()
    optimizer.step()  # moments exist, as in a run's checkpoint
    started = time.perf_counter()
    Checkpointer(run_dir / "checkpoints").save(1, [model], optimizer, {"step": 1})
    return run_dir, data, time.perf_counter() - started


def handwritten(run_dir: Path, data: Path, batch: int) -> float:
    """rows/s of a plain loop: the model in memory, the rows memory-mapped, no files written."""
    model = consolidate(run_dir, progress=False).model
    x = np.load(data / "x.npy", mmap_mode="r")
    started = time.perf_counter()
    outputs = []
    with torch.no_grad():
        for begin in range(0, len(x), batch):
            outputs.append(torch.softmax(model(torch.from_numpy(np.array(x[begin:begin + batch]))), -1))
    torch.cat(outputs)
    return len(x) / (time.perf_counter() - started)


def serve_latency(run_dir: Path, features: int, clients: int, requests: int) -> dict:
    """p50/p99 milliseconds of one-row POST /predict requests from `clients` threads."""
    from shoal.export.serve import make_server
    server, batcher = make_server(consolidate(run_dir, progress=False), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/predict"
    body = json.dumps({"rows": [[0.1] * features]}).encode()
    latencies: list[float] = []

    def client() -> None:
        for _ in range(requests):
            started = time.perf_counter()
            request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as reply:
                reply.read()
            latencies.append((time.perf_counter() - started) * 1000)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    server.shutdown()
    server.server_close()
    batcher.stop()
    ordered = sorted(latencies)
    return {"clients": clients, "requests": len(ordered), "p50_ms": statistics.median(ordered),
            "p99_ms": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], "requests_per_s": len(ordered) / wall,
            "mean_batch_rows": statistics.mean(batcher.batch_sizes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check the script runs")
    args = parser.parse_args()
    size = SIZES["quick" if args.quick else "full"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run_dir, data, save_s = make_run(root, size)
        started = time.perf_counter()
        export(consolidate(run_dir, progress=False), "safetensors", root / "model.safetensors")
        export_s = time.perf_counter() - started
        started = time.perf_counter()
        export(consolidate(run_dir, progress=False), "torch-export", root / "model.pt2")
        torch_export_s = time.perf_counter() - started
        loop = handwritten(run_dir, data, size["batch"])
        rates = {}
        for nproc in (1, 2):
            started = time.perf_counter()
            predict(run_dir, [str(data)], root / f"out{nproc}", nproc=nproc, batch_size=size["batch"],
                    part_rows=max(size["rows"] // 8, 1))
            rates[nproc] = size["rows"] / (time.perf_counter() - started)
        latency = [serve_latency(run_dir, size["features"], clients, size["requests"] // clients)
                   for clients in (1, 8)]
    result = {"size": size, "serve": latency, "load_average": os.getloadavg(), "handwritten_rows_per_s": loop,
              "predict_rows_per_s": rates, "predict_1_vs_loop": rates[1] / loop, "predict_2_vs_1": rates[2] / rates[1],
              "checkpoint_save_s": save_s, "export_safetensors_s": export_s, "export_torch_s": torch_export_s,
              "export_vs_save": export_s / save_s}
    print(f"{size['rows']} rows x {size['features']} features, mlp {size['flavour']}, batch {size['batch']}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| what | rows/s | vs hand-written loop |\n| --- | ---: | ---: |")
    print(f"| hand-written no_grad loop | {loop:,.0f} | 1.00x |")
    for nproc, rate in rates.items():
        print(f"| shoal predict, {nproc} worker{'s' if nproc > 1 else ''} | {rate:,.0f} | {rate / loop:.2f}x |")
    print(f"\n| step | seconds | vs save |\n| --- | ---: | ---: |\n| checkpoint save | {save_s:.2f} | 1.00x |")
    print(f"| export safetensors (load + write) | {export_s:.2f} | {export_s / save_s:.2f}x |")
    print(f"| export torch-export (load + trace + write) | {torch_export_s:.2f} | {torch_export_s / save_s:.2f}x |")
    print("\n| serve clients | requests | p50 ms | p99 ms | requests/s | rows per batch |\n"
          "| ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in latency:
        print(f"| {row['clients']} | {row['requests']} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | "
              f"{row['requests_per_s']:,.0f} | {row['mean_batch_rows']:.1f} |")
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    (out / f"inference{'-quick' if args.quick else ''}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
