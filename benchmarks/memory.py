"""Per-rank memory of parameters + gradients + optimizer state: replicated (DDP) vs fully
sharded (FSDP) vs tensor parallel vs pipeline parallel, on 2 and 4 Gloo ranks.

Measured on each rank after one AdamW step (the bytes of the tensors it holds: its shards
only), next to `shoal plan`'s estimate. Goal (issue 3): FSDP's per-rank state at most 1/N
of replicated + 10%.

    .venv/bin/python benchmarks/memory.py            # table on stdout, JSON in benchmarks/out/
    .venv/bin/python benchmarks/memory.py --hf [--quick]   # a Hugging Face Llama: FSDP per block vs one unit

The `--hf` rows train an unchanged `transformers` LlamaForCausalLM (built from a config,
no download) under FSDP with its blocks found automatically (one FSDP unit per decoder
layer) and with the whole base model as one unit (what Shoal did before it found HF
blocks). Both shard the steady state (params+grads+optimizer, against 1/N + 10% of
replicated); they differ in what is gathered at once: the largest FSDP unit's full
parameters, shown in the last column (computed from the units, not measured).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from shoal.config import Config
from shoal.data.spec import DataSpec
from shoal.models import build_model
from shoal.parallel.compose import check_layout, parallelize
from shoal.plan.measure import state_bytes
from shoal.plan.memory import estimate_memory
from shoal.runtime.env import end_distributed  # (importing it comes before any init_process_group)

VOCAB, SEQ, BATCH = 256, 32, 8
LAYOUTS = {
    "replicated": {"dp_replicate": -1},
    "fsdp": {"dp_shard": -1},
    "tp": {"tp": -1},
    "pp": {"pp": -1},
}


def config(world: int, layout: dict) -> Config:
    cfg = Config()
    cfg.model.name, cfg.model.dim, cfg.model.n_layers, cfg.model.n_heads = "gpt", 128, 4, 4
    cfg.data.seq_len, cfg.train.batch_size = SEQ, BATCH
    cfg.parallel.dp_replicate, cfg.parallel.pp_microbatches = 1, 4
    for axis, degree in layout.items():
        setattr(cfg.parallel, axis, world if degree == -1 else degree)
    return cfg


def worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    spec = DataSpec(kind="tokens", vocab_size=VOCAB, seq_len=SEQ)
    rows = {}
    for name, layout in LAYOUTS.items():
        cfg = config(world, layout)
        dims = check_layout(cfg, world)
        mesh = dims.build_mesh("cpu")
        torch.manual_seed(0)
        pm = parallelize(build_model(cfg.model, spec), dims, mesh, cfg, torch.device("cpu"))
        opt = torch.optim.AdamW(pm.parameters())
        tokens = torch.randint(0, VOCAB, (BATCH // dims.dp, SEQ + 1))
        pm.forward_backward(tokens[:, :-1], tokens[:, 1:], 1.0)
        opt.step()
        rows[name] = state_bytes(pm.parameters(), opt)
        with torch.device("meta"):
            rows[name]["estimate"] = estimate_memory(cfg, dims, build_model(cfg.model, spec)).state
        dist.barrier()
    Path(out, f"rank{rank}.json").write_text(json.dumps(rows))
    end_distributed(pm.ddp)


HF_LAYOUTS = {
    "hf_replicated": {"dp_replicate": -1},
    "hf_fsdp_per_block": {"dp_shard": -1},
    "hf_fsdp_one_unit": {"dp_shard": -1, "shard_modules": ["LlamaModel"]},
}


def hf_folder(root: str, quick: bool) -> str:
    import transformers
    size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2) if quick else \
        dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8)
    config = transformers.LlamaConfig(vocab_size=VOCAB, num_attention_heads=8, num_key_value_heads=4,
                                      max_position_embeddings=SEQ, architectures=["LlamaForCausalLM"], **size)
    config.save_pretrained(root)
    return root


def largest_unit_bytes(parts) -> int:
    """Bytes of the largest FSDP unit's full parameters: what one all-gather materialises."""
    from torch.distributed.fsdp import FSDPModule
    largest = 0
    for part in parts:
        units = [m for m in part.modules() if isinstance(m, FSDPModule)]
        for unit in units:
            nested = {id(p) for other in units if other is not unit and _inside(other, unit)
                      for p in other.parameters()}
            largest = max(largest, sum(p.numel() * p.element_size() for p in unit.parameters()
                                       if id(p) not in nested))
    return largest


def _inside(module, container) -> bool:
    return any(m is module for m in container.modules())


def hf_worker(rank: int, world: int, port: int, out: str, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    spec = DataSpec(kind="tokens", vocab_size=VOCAB, seq_len=SEQ)
    rows = {}
    for name, layout in HF_LAYOUTS.items():
        cfg = config(world, {k: v for k, v in layout.items() if k != "shard_modules"})
        cfg.model.hf, cfg.parallel.shard_modules = folder, layout.get("shard_modules", [])
        dims = check_layout(cfg, world)
        torch.manual_seed(0)
        pm = parallelize(build_model(cfg.model, spec), dims, dims.build_mesh("cpu"), cfg, torch.device("cpu"))
        opt = torch.optim.AdamW(pm.parameters())
        tokens = torch.randint(0, VOCAB, (BATCH // dims.dp, SEQ + 1))
        for _ in range(2):  # a few steps, as training would
            pm.forward_backward(tokens[:, :-1], tokens[:, 1:], 1.0)
            opt.step()
            opt.zero_grad(set_to_none=False)
        rows[name] = {**state_bytes(pm.parameters(), opt), "largest_unit": largest_unit_bytes(pm.model_parts)}
        dist.barrier()
    Path(out, f"rank{rank}.json").write_text(json.dumps(rows))
    end_distributed(pm.ddp)


def main_hf(quick: bool) -> None:
    results = []
    with tempfile.TemporaryDirectory() as root:
        folder = hf_folder(root, quick)
        for world in (2,) if quick else (2, 4):
            with tempfile.TemporaryDirectory() as out:
                mp.spawn(hf_worker, args=(world, free_port(), out, folder), nprocs=world)
                ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
            replicated = max(r["hf_replicated"]["params"] + r["hf_replicated"]["grads"]
                             + r["hf_replicated"]["optimizer"] for r in ranks)
            for name in HF_LAYOUTS:
                state = max(r[name]["params"] + r[name]["grads"] + r[name]["optimizer"] for r in ranks)
                results.append({"world": world, "layout": name, "state_bytes_max_rank": state,
                                "fraction_of_replicated": state / replicated,
                                "goal_fraction": 1 / world * 1.10 if "fsdp" in name else None,
                                "largest_gathered_bytes": max(r[name]["largest_unit"] for r in ranks)})
    print(f"{'world':>5} {'layout':<19}{'state/rank (MB)':>16}{'x replicated':>14}  {'goal':<16}"
          f"{'largest gather (MB)':>20}")
    for row in results:
        goal = f"<= {row['goal_fraction']:.3f}" if row["goal_fraction"] else ""
        ok = ("  met" if row["fraction_of_replicated"] <= row["goal_fraction"] else "  MISSED") if goal else ""
        print(f"{row['world']:>5} {row['layout']:<19}{row['state_bytes_max_rank'] / 1e6:>16.3f}"
              f"{row['fraction_of_replicated']:>14.3f}  {goal + ok:<16}{row['largest_gathered_bytes'] / 1e6:>20.3f}")
    target = Path(__file__).parent / "out" / ("memory_hf_quick.json" if quick else "memory_hf.json")
    target.parent.mkdir(exist_ok=True)
    target.write_text(json.dumps({"command": " ".join([Path(sys.executable).name, *sys.argv]),
                                  "model": "transformers LlamaForCausalLM " + ("hidden 64, 2 layers" if quick else
                                                                               "hidden 512, 8 layers"),
                                  "rows": results}, indent=1))
    print(f"wrote {target}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    results = []
    for world in (2, 4):
        with tempfile.TemporaryDirectory() as out:
            mp.spawn(worker, args=(world, free_port(), out), nprocs=world)
            ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
        replicated = max(r["replicated"]["params"] + r["replicated"]["grads"] + r["replicated"]["optimizer"]
                         for r in ranks)
        for name in LAYOUTS:
            state = max(r[name]["params"] + r[name]["grads"] + r[name]["optimizer"] for r in ranks)
            results.append({"world": world, "layout": name, "state_bytes_max_rank": state,
                            "estimate_bytes": ranks[0][name]["estimate"] if name != "pp" else
                            max(r[name]["estimate"] for r in ranks),
                            "fraction_of_replicated": state / replicated,
                            "goal_fraction": 1 / world * 1.10 if name == "fsdp" else None})
    print(f"{'world':>5} {'layout':<11}{'state/rank (MB)':>16}{'estimate (MB)':>15}{'x replicated':>14}  goal")
    for row in results:
        goal = f"<= {row['goal_fraction']:.3f}" if row["goal_fraction"] else ""
        ok = ("  met" if row["fraction_of_replicated"] <= row["goal_fraction"] else "  MISSED") if goal else ""
        print(f"{row['world']:>5} {row['layout']:<11}{row['state_bytes_max_rank'] / 1e6:>16.3f}"
              f"{row['estimate_bytes'] / 1e6:>15.3f}{row['fraction_of_replicated']:>14.3f}  {goal}{ok}")
    target = Path(__file__).parent / "out" / "memory.json"
    target.parent.mkdir(exist_ok=True)
    target.write_text(json.dumps({"command": " ".join([Path(sys.executable).name, *sys.argv]),
                                  "model": "gpt dim=128 n_layers=4 n_heads=4 vocab=256", "rows": results}, indent=1))
    print(f"wrote {target}")


if __name__ == "__main__":
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if "--hf" in sys.argv:
        main_hf("--quick" in sys.argv)
    else:
        main()
