"""The data path's costs: memory against data-set size, loader throughput, and prepare speed.

1. Peak resident memory of a process reading token-shard windows, against the size of the
   shard set on disk (default 20 MB, 2 GB, 8 GB of tokens), read through Shoal's pread
   reader and, for comparison, through np.memmap. Goal: flat, at most +10%.
2. Loader throughput, source by source, with no model; and the share of a real training
   step spent waiting for data: the quickstart model (gpt debug) on shards, and the imaging
   example (cnn debug) with 0 and 2 loader workers. Goal: at most 2% of the step.
3. `shoal data prepare` MB/s on the standard library's sources with the bundled BPE, with
   1 and more workers, against a plain loop calling the same tokenizer (best of 3 each). Goal: >= 1x with
   1 worker, scaling with workers.

    .venv/bin/python benchmarks/data.py            # full sizes: needs ~10 GB of disk and a quiet machine
    .venv/bin/python benchmarks/data.py --quick    # tiny sizes: shows that it works, numbers mean little
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from shoal.config import DataConfig, ModelConfig
from shoal.data import ShardedSampler, build_dataset
from shoal.data.datasets import stdlib_files
from shoal.data.prepare import ShardWriter, prepare, write_index
from shoal.data.tokenizer import encode_documents, load_tokenizer
from shoal.models import build_model, compute_loss
from shoal.runtime.env import thread_budget

OUT = Path(__file__).parent / "out" / "data.json"

READER = """
import sys, numpy as np, torch
from shoal.data import ShardedSampler
from shoal.data.shards import TokenShards
data = TokenShards(sys.argv[1], 256)
if sys.argv[2] == "memmap":  # the same windows through a memory map, for comparison
    maps = [np.memmap(data.folder / s["file"], dtype=data.dtype, mode="r") for s in data.index["shards"]]
    def read(start, count):
        k = int(np.searchsorted(data.starts, start, side="right")) - 1
        return np.asarray(maps[k][start - data.starts[k]:start - data.starts[k] + count])
    data.read = read
sampler = ShardedSampler(len(data), 64, seed=0)
for _ in range(int(sys.argv[3])):
    data.get(sampler.next_batch(0, 1))
print([int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')][0])
"""


def write_shards(folder: Path, tokens: int) -> None:
    folder.mkdir(parents=True)
    writer = ShardWriter(folder, "u00000", 128_000_000, "uint16")
    chunk = np.random.default_rng(0).integers(0, 256, 8_000_000, dtype=np.uint16)
    for start in range(0, tokens, len(chunk)):
        writer.write(chunk[:tokens - start])
    write_index(folder, writer.finish(), {"name": "bytes", "vocab_size": 256, "eos": None})


def memory_vs_size(tmp: Path, sizes_mb: list[int], batches: int) -> list[dict]:
    rows = []
    for mb in sizes_mb:
        folder = tmp / f"shards-{mb}mb"
        write_shards(folder, mb * 1_000_000 // 2)
        row = {"size_mb": mb}
        for how in ("pread", "memmap"):
            out = subprocess.run([sys.executable, "-c", READER, str(folder), how, str(batches)], check=True,
                                 capture_output=True, text=True)
            row[f"{how}_peak_rss_mb"] = int(out.stdout) / 1024
        rows.append(row)
        for f in folder.iterdir():
            f.unlink()
    os.sync()  # the kernel writing gigabytes back would otherwise slow the timed sections that follow
    return rows


def time_gets(data, batch: int, batches: int) -> float:
    """Samples per second of `data.get` alone."""
    sampler = ShardedSampler(len(data), batch, seed=0)
    if hasattr(data, "follow"):
        data.follow(sampler, lambda: (0, 1))
    data.get(sampler.next_batch(0, 1))  # first batch: opens files, starts workers
    start = time.perf_counter()
    for _ in range(batches):
        data.get(sampler.next_batch(0, 1))
    return batch * batches / (time.perf_counter() - start)


def data_wait_share(cfg: DataConfig, model_cfg: ModelConfig, batch: int, steps: int) -> dict:
    """Train for `steps` steps in this process, with the threads a worker would take (its loader
    processes each keep a core); the share of each step spent in train_set.get."""
    torch.set_num_threads(thread_budget(0, {}, loader_workers=cfg.loader_workers))
    torch.manual_seed(0)
    train, _, spec = build_dataset(cfg, seed=0)
    model = build_model(model_cfg, spec)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sampler = ShardedSampler(len(train), batch, seed=0)
    if hasattr(train, "follow"):
        train.follow(sampler, lambda: (0, 1))
    waited = total = 0.0
    for step in range(steps + 2):
        started = time.perf_counter()
        x, y = train.get(sampler.next_batch(0, 1))
        got = time.perf_counter()
        compute_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        if step >= 2:  # the first steps start loader workers and allocate
            waited += got - started
            total += time.perf_counter() - started
    return {"threads": torch.get_num_threads(), "data_wait_ms": 1000 * waited / steps,
            "step_ms": 1000 * total / steps, "share": waited / total}


def prepare_speed(tmp: Path, max_bytes: int, workers: list[int], repeats: int = 3) -> list[dict]:
    """MB/s of input; each way is timed `repeats` times, interleaved, and the best kept (the machine is shared)."""
    files = [str(f) for f in stdlib_files(max_bytes)]
    mb = sum(Path(f).stat().st_size for f in files) / 1e6
    tok = load_tokenizer("bpe")
    best: dict[str, float] = {}
    for attempt in range(repeats):
        start = time.perf_counter()
        for f in files:  # the plain loop: the same tokenizer, one document per file
            np.array(encode_documents(tok, [Path(f).read_text(errors="replace")])[0], dtype=np.uint16)
        best["plain tokenizer loop"] = min(best.get("plain tokenizer loop", 1e9), time.perf_counter() - start)
        for n in workers:
            name = f"shoal data prepare --workers {n}"
            start = time.perf_counter()
            prepare(files, tmp / f"prepared-{n}-{attempt}", tokenizer="bpe",
                    shard_size=max(1_000_000, int(mb * 1e6) // 16), workers=n, progress=False)
            best[name] = min(best.get(name, 1e9), time.perf_counter() - start)
    plain = best["plain tokenizer loop"]
    return [{"how": how, "input_mb": mb, "mb_per_s": mb / seconds, "vs_plain": plain / seconds}
            for how, seconds in best.items()]


def loaders(tmp: Path, quick: bool) -> tuple[list[dict], list[dict]]:
    sys.path.insert(0, str(Path(__file__).parents[1] / "examples" / "imaging"))
    import make_data
    images = make_data.make(tmp / "shapes", 50 if quick else 500, size=40)
    prepare([str(f) for f in stdlib_files(2_000_000)], tmp / "stdlib", progress=False)
    import pyarrow as pa
    import pyarrow.parquet as pq
    texts = [Path(f).read_text(errors="replace")[:2000] for f in stdlib_files(2_000_000)]
    pq.write_table(pa.table({"text": texts}), tmp / "text.parquet")
    ids = [list(range(i, i + 300)) for i in range(0, 300 * 2000, 300)]
    with pa.ipc.new_file(str(tmp / "ids.arrow"), pa.schema([("input_ids", pa.list_(pa.int32()))])) as w:
        w.write_table(pa.table({"input_ids": pa.array(ids, pa.list_(pa.int32()))}))
    batches = 10 if quick else 100
    sources = {
        "shards (bytes), seq 64": DataConfig(source="shards", path=str(tmp / "stdlib"), seq_len=64),
        "arrow token ids, seq 64": DataConfig(source="arrow", path=str(tmp / "ids.arrow"), seq_len=64),
        "parquet text + bpe, seq 64": DataConfig(source="parquet", path=str(tmp / "text.parquet"), seq_len=64,
                                                 tokenizer="bpe"),
        "images 32px, 0 workers": DataConfig(source="images", path=str(images), image_size=32),
        "images 32px, 2 workers": DataConfig(source="images", path=str(images), image_size=32, loader_workers=2),
    }
    throughput = [{"source": name, "samples_per_s": time_gets(build_dataset(cfg)[0], 32, batches)}
                  for name, cfg in sources.items()]
    steps = 5 if quick else 50
    waits = [{"run": "quickstart on shards (gpt debug, batch 16)",
              **data_wait_share(sources["shards (bytes), seq 64"], ModelConfig(name="gpt"), 16, steps)}]
    for workers in (0, 2):
        waits.append({"run": f"imaging example (cnn debug, batch 16), {workers} loader workers",
                      **data_wait_share(sources[f"images 32px, {workers} workers"], ModelConfig(name="cnn"), 16,
                                        steps)})
    return throughput, waits


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    head = " | ".join(title for _, title, _ in columns)
    lines = [head, "-" * len(head)]
    lines += [" | ".join(format(r[key], fmt) for key, _, fmt in columns) for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    args = parser.parse_args()
    sizes = [2, 20] if args.quick else [20, 2000, 8000]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        memory = memory_vs_size(tmp, sizes, 50 if args.quick else 500)
        print(table(memory, [("size_mb", "tokens on disk (MB)", ">19"), ("pread_peak_rss_mb", "peak RSS, pread (MB)",
                              ">20.1f"), ("memmap_peak_rss_mb", "peak RSS, np.memmap (MB)", ">24.1f")]), "\n")
        throughput, waits = loaders(tmp, args.quick)
        print(table(throughput, [("source", "source", "<28"), ("samples_per_s", "samples/s (get only)", ">20,.0f")]), "\n")
        print(table(waits, [("run", "training in one process", "<58"), ("threads", "threads", ">7"),
                            ("step_ms", "step (ms)", ">9.1f"),
                            ("data_wait_ms", "data wait (ms)", ">14.2f"), ("share", "share", ">6.1%")]), "\n")
        speed = prepare_speed(tmp, 2_000_000 if args.quick else 8_000_000, [1, 2] if args.quick else [1, 2, 4])
        print(table(speed, [("how", "tokenising the stdlib with the bundled BPE", "<42"), ("input_mb", "MB", ">5.1f"),
                            ("mb_per_s", "MB/s", ">6.2f"), ("vs_plain", "vs plain loop", ">13.2f")]))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"quick": args.quick, "memory": memory, "loader_throughput": throughput,
                               "data_wait": waits, "prepare": speed}, indent=1))
    print(f"\nJSON: {OUT}")


if __name__ == "__main__":
    main()
