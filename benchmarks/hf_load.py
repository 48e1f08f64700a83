"""Peak memory per worker while a sharded Hugging Face checkpoint loads under FSDP: each rank
reading only its share from the meta device (shoal/models/hf_weights.py) against every rank
loading the whole model first (what Shoal did before; still what DDP does).

A Llama-shaped model (about 2.2 GB in fp32 by default) with random weights is written once
by `save_pretrained` as sharded safetensors under /tmp (not the repository), then loaded by 4
Gloo workers with parallel.dp_shard = 4, each mode in fresh processes. Goal (issue 22): peak
RSS per worker while loading <= 1/4 of the model + its largest tensor + 400 MB.

    .venv/bin/python benchmarks/hf_load.py                 # table on stdout, JSON in benchmarks/out/
    .venv/bin/python benchmarks/hf_load.py --layers 2      # a smaller model, for a quick look

RSS counts the resident pages of the mapped checkpoint files too (safetensors memory-maps
them): a rank that reads a slice touches only the slice's pages.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shoal.config import Config  # noqa: E402
from shoal.data.spec import DataSpec  # noqa: E402
from shoal.models import build_model  # noqa: E402
from shoal.models.hf_weights import load_per_rank  # noqa: E402
from shoal.parallel.compose import check_layout, parallelize  # noqa: E402
from shoal.runtime.env import end_distributed  # noqa: E402  (imported before any init_process_group)

WORLD = 4
MB = 2 ** 20


def rss_mb() -> float:
    """This process's resident set now (from /proc: ru_maxrss holds only the peak)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / MB


def peak_rss_mb() -> float:
    """The peak resident set of this process's memory since the last reset_peak() (VmHWM).
    Not ru_maxrss: Linux carries that over fork and exec, from the parent that wrote the model."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS


def write_model(folder: Path, layers: int) -> dict:
    """A random-weight Llama of `layers` decoder layers, saved in 500 MB safetensors parts."""
    import transformers
    config = transformers.LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                                      num_attention_heads=16, num_key_value_heads=16, vocab_size=32000,
                                      max_position_embeddings=512, tie_word_embeddings=False,
                                      architectures=["LlamaForCausalLM"])
    if not (folder / "model.safetensors.index.json").is_file():
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(config).save_pretrained(folder, max_shard_size="500MB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    from safetensors import safe_open
    largest = 0
    for part in set(index["weight_map"].values()):
        with safe_open(str(folder / part), framework="pt") as f:
            for key in f.keys():
                shape = f.get_slice(key).get_shape()
                largest = max(largest, 4 * int(torch.Size(shape).numel()))
    return {"model_mb": index["metadata"]["total_size"] / MB, "largest_tensor_mb": largest / MB,
            "files": len(set(index["weight_map"].values()))}


def _worker(rank: int, port: int, folder: str, mode: str, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), GLOO_SOCKET_IFNAME="lo")
    store = dist.TCPStore("127.0.0.1", port, WORLD, is_master=rank == 0)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD)
    cfg = Config()
    cfg.model.hf, cfg.parallel.dp_replicate, cfg.parallel.dp_shard = folder, 1, WORLD
    cfg.data.seq_len = 32
    dims = check_layout(cfg, WORLD)
    mesh = dims.build_mesh("cpu")
    spec = DataSpec(kind="tokens", vocab_size=256, seq_len=32)
    dist.barrier()
    reset_peak()
    before = rss_mb()
    start = time.perf_counter()
    model = build_model(cfg.model, spec, params_on_meta=mode == "per_rank")
    pm = parallelize(model, dims, mesh, cfg, torch.device("cpu"))
    if mode == "per_rank":
        load_per_rank(pm.model_parts, folder, torch.device("cpu"))
    seconds = time.perf_counter() - start
    peak = peak_rss_mb()
    held = sum(p.to_local().numel() * p.element_size() for p in pm.parameters()) / MB
    # a check that the weights are the checkpoint's: one tensor gathered and compared
    weight = dict(pm.model_parts[0].named_parameters())["model.norm.weight"].full_tensor()
    from safetensors import safe_open
    index = json.loads(Path(folder, "model.safetensors.index.json").read_text())
    with safe_open(str(Path(folder, index["weight_map"]["model.norm.weight"])), framework="pt") as f:
        same = bool(torch.equal(weight, f.get_tensor("model.norm.weight")))
    Path(out, f"{mode}_rank{rank}.json").write_text(json.dumps(
        {"rss_before_mb": before, "peak_rss_mb": peak, "seconds": seconds, "held_mb": held, "weights_match": same}))
    dist.barrier()
    end_distributed()


def measure(folder: Path, mode: str, out: Path) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(folder), mode, str(out)), nprocs=WORLD, join=True)
    return [json.loads((out / f"{mode}_rank{r}.json").read_text()) for r in range(WORLD)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8, help="decoder layers (8: about 2.2 GB in fp32)")
    parser.add_argument("--folder", default="/tmp/shoal-hf-load-llama", help="where the checkpoint is written")
    args = parser.parse_args()
    folder = Path(f"{args.folder}-{args.layers}l")
    model = write_model(folder, args.layers)
    goal = model["model_mb"] / WORLD + model["largest_tensor_mb"] + 400
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    rows = {mode: measure(folder, mode, out) for mode in ("per_rank", "whole")}
    print(f"Llama {args.layers} layers: {model['model_mb']:.0f} MB in {model['files']} safetensors files, largest "
          f"tensor {model['largest_tensor_mb']:.0f} MB; FSDP on {WORLD} Gloo workers")
    print(f"goal: peak RSS per worker <= {model['model_mb']:.0f}/{WORLD} + {model['largest_tensor_mb']:.0f} + 400 "
          f"= {goal:.0f} MB")
    print(f"{'load':<10} {'RSS before MB':>14} {'peak RSS MB (max worker)':>25} {'peak - before':>14} "
          f"{'held MB':>8} {'seconds':>8} {'weights ok':>10} {'goal':>5}")
    result = {"model": model, "world": WORLD, "goal_mb": goal, "modes": {}}
    for mode, ranks in rows.items():
        worst = max(ranks, key=lambda r: r["peak_rss_mb"])
        ok = worst["peak_rss_mb"] <= goal
        print(f"{mode:<10} {worst['rss_before_mb']:>14.0f} {worst['peak_rss_mb']:>25.0f} "
              f"{worst['peak_rss_mb'] - worst['rss_before_mb']:>14.0f} {worst['held_mb']:>8.0f} "
              f"{max(r['seconds'] for r in ranks):>8.1f} {str(all(r['weights_match'] for r in ranks)):>10} "
              f"{'met' if ok else 'no':>5}")
        result["modes"][mode] = {"ranks": ranks, "goal_met": ok}
    (out / "hf_load.json").write_text(json.dumps(result, indent=1))
    print(f"JSON: {out / 'hf_load.json'}")


if __name__ == "__main__":
    main()
