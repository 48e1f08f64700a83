"""Batch inference and export cost: `shoal predict` against a hand-written loop, and
`shoal export` against the checkpoint's own save time.

1. rows/s of `predict` (the Python API `shoal predict` calls) on 1 and 2 worker processes,
   wall clock from the call to the index (model loading and worker start-up included),
   against a hand-written `torch.no_grad()` loop over the same memory-mapped rows with the
   model already in memory, batch for batch; each with all cores and with one thread per
   worker, in alternating repeats (median of per-pair ratios). Goals: 1 worker at least
   0.95x the loop; 2 workers near 2x one at the same threads per worker (with default
   threads, one worker already computes on every core).
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
from shoal.runtime.checkpoint import Checkpointer

SIZES = {"full": {"rows": 400_000, "features": 64, "flavour": "medium", "batch": 1024, "requests": 4000},
         "quick": {"rows": 20_000, "features": 16, "flavour": "debug", "batch": 512, "requests": 400}}


def make_run(root: Path, size: dict, repeats: int) -> tuple[Path, Path, list[float], list[float], list[float]]:
    """A run directory with checkpoints of an mlp for the rows; the seconds each save took, and
    each export of the newest checkpoint right after it (safetensors, torch-export)."""
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
    saves, safetensors, torch_exports = [], [], []
    for step in range(1, repeats + 1):  # alternating: save, export, torch-export
        started = time.perf_counter()
        Checkpointer(run_dir / "checkpoints", keep=1).save(step, [model], optimizer, {"step": step})
        saves.append(time.perf_counter() - started)
        started = time.perf_counter()
        export(consolidate(run_dir, progress=False), "safetensors", root / f"model-{step}.safetensors")
        safetensors.append(time.perf_counter() - started)
        started = time.perf_counter()
        export(consolidate(run_dir, progress=False), "torch-export", root / f"model-{step}.pt2")
        torch_exports.append(time.perf_counter() - started)
    return run_dir, data, saves, safetensors, torch_exports


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
    parser.add_argument("--repeats", type=int, default=3, help="alternating repeats of each way")
    args = parser.parse_args()
    size = SIZES["quick" if args.quick else "full"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run_dir, data, saves, safetensors, torch_exports = make_run(root, size, args.repeats)
        save_s, export_s, torch_export_s = (statistics.median(t) for t in (saves, safetensors, torch_exports))
        export_ratio = statistics.median(e / s for e, s in zip(safetensors, saves))
        torch_export_ratio = statistics.median(e / s for e, s in zip(torch_exports, saves))
        # Alternating repeats; ratios are taken pair by pair and their median quoted.
        runs: dict[str, list[float]] = {}
        startup: dict[str, list[float]] = {}
        tiny = root / "tiny.npy"
        np.save(tiny, np.load(data / "x.npy", mmap_mode="r")[:2 * size["batch"]])
        cores = torch.get_num_threads()
        for attempt in range(args.repeats):
            for threads in (cores, 1):
                torch.set_num_threads(threads)
                runs.setdefault(f"loop {threads}t", []).append(handwritten(run_dir, data, size["batch"]))
            torch.set_num_threads(cores)
            for nproc, threads in ((1, 0), (1, 1), (2, 0)):
                name = f"predict {nproc}w {threads or 'default'}"
                started = time.perf_counter()
                predict(run_dir, [str(data)], root / f"out-{attempt}-{nproc}-{threads}", nproc=nproc,
                        batch_size=size["batch"], part_rows=max(size["rows"] // 8, 1), threads=threads)
                runs.setdefault(name, []).append(size["rows"] / (time.perf_counter() - started))
                # the fixed cost: the same call on one part per worker of one batch each
                started = time.perf_counter()
                predict(run_dir, [str(tiny)], root / f"tiny-{attempt}-{nproc}-{threads}", nproc=nproc,
                        batch_size=size["batch"], part_rows=size["batch"], threads=threads)
                startup.setdefault(name, []).append(time.perf_counter() - started)

        def ratio(a: str, b: str) -> float:
            return statistics.median(x / y for x, y in zip(runs[a], runs[b]))

        def steady(name: str) -> list[float]:  # rows/s with the fixed cost taken off the wall clock
            return [size["rows"] / (size["rows"] / rate - fixed) for rate, fixed in zip(runs[name], startup[name])]
        rates = {name: statistics.median(values) for name, values in runs.items()}
        ratios = {"predict 1 worker (all cores) vs loop (all cores)": ratio("predict 1w default", f"loop {cores}t"),
                  "predict 1 worker (1 thread) vs loop (1 thread)": ratio("predict 1w 1", "loop 1t"),
                  "predict 2 workers (1 thread each) vs 1 worker (1 thread)": ratio("predict 2w default",
                                                                                    "predict 1w 1"),
                  "predict 2 workers vs 1 worker, defaults": ratio("predict 2w default", "predict 1w default"),
                  "predict 2 workers vs 1 worker (1 thread each), start-up taken off": statistics.median(
                      x / y for x, y in zip(steady("predict 2w default"), steady("predict 1w 1")))}
        fixed_costs = {name: statistics.median(values) for name, values in startup.items()}
        latency = [serve_latency(run_dir, size["features"], clients, size["requests"] // clients)
                   for clients in (1, 8)]
    result = {"size": size, "cores": cores, "repeats": args.repeats, "serve": latency,
              "load_average": os.getloadavg(), "rows_per_s_runs": runs, "rows_per_s_median": rates,
              "ratios_median_of_pairs": ratios, "startup_s": startup, "checkpoint_save_s": save_s, "export_safetensors_s": export_s,
              "export_torch_s": torch_export_s, "export_vs_save": export_ratio,
              "torch_export_vs_save": torch_export_ratio, "save_runs_s": saves, "export_runs_s": safetensors,
              "torch_export_runs_s": torch_exports}
    print(f"{size['rows']} rows x {size['features']} features, mlp {size['flavour']}, batch {size['batch']}, "
          f"{cores} cores, {args.repeats} alternating repeats, load average {os.getloadavg()[0]:.1f}")
    print("| what | rows/s (median) |\n| --- | ---: |")
    for name, rate in rates.items():
        fixed = f" (start-up {fixed_costs[name]:.2f} s)" if name in fixed_costs else ""
        print(f"| {name}{fixed} | {rate:,.0f} |")
    print("\n| comparison | median of per-pair ratios |\n| --- | ---: |")
    for name, value in ratios.items():
        print(f"| {name} | {value:.2f}x |")
    print(f"\n| step (median of {args.repeats}) | seconds | vs save (median of pairs) |\n| --- | ---: | ---: |\n"
          f"| checkpoint save | {save_s:.2f} | 1.00x |")
    print(f"| export safetensors (load + write) | {export_s:.2f} | {export_ratio:.2f}x |")
    print(f"| export torch-export (load + trace + write) | {torch_export_s:.2f} | {torch_export_ratio:.2f}x |")
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
