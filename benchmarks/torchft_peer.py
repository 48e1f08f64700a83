"""torchft's DiLoCo beside Shoal's on the same model, tokens, H and outer step: the peer row of issue 28.

torchft (github.com/pytorch/torchft) runs DiLoCo as `torchft.local_sgd.DiLoCo`, a context manager
over a Manager that finds the other replica groups through its Rust lighthouse. Here each replica
group is one process with its own TCPStore, the lighthouse runs in this process, and the groups
talk over Gloo on loopback. Every replica trains the gpt Shoal builds, from the same initial
weights, on its slice of the same global batches as benchmarks/diloco_sweep.py gives it, with the
same AdamW, lr schedule and clipping; every `--inner-steps` torchft averages the pseudo-gradients
(fp32: torchft's quantisation needs CUDA/Triton) and steps the outer Nesterov SGD. torchft has no
outer lr warm-up, so the Shoal row to compare it with is the simulation with `outer_warmup 0`:

    PYTHONPATH=/tmp/torchft .venv/bin/python benchmarks/torchft_peer.py --dim 64 --layers 2 --steps 600
    .venv/bin/python benchmarks/diloco_sweep.py --dim 64 --layers 2 --steps 600 \
        --settings "2:30:1.0:0.5:0:1:none;2:30:1.0:0.5:5:1:int8"

torchft is not a Shoal dependency: install it beside torch into a scratch folder
(`pip install --target /tmp/torchft torchft==0.2.0 --no-deps`; it needs the opentelemetry packages).
Appends one JSON line to --out (default benchmarks/out/torchft_peer.jsonl).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import diloco_sweep as sweep  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def replica(replica_id: int, args, lighthouse: str, results) -> None:
    from torchft import Manager, ProcessGroupGloo
    from torchft.local_sgd import DiLoCo

    torch.set_num_threads(1)
    cfg, train, val, spec = sweep.setup(args)
    order = sweep.batches(train, cfg, args.steps)
    model = sweep.fresh_model(cfg, spec)
    inner = sweep.build_optimizer(model.parameters(), cfg.train)
    outer = torch.optim.SGD(model.parameters(), lr=args.outer_lr, momentum=args.outer_momentum,
                            nesterov=args.outer_momentum > 0)
    store = torch.distributed.TCPStore("127.0.0.1", free_port(), is_master=True, wait_for_workers=False)
    manager = Manager(pg=ProcessGroupGloo(), load_state_dict=model.load_state_dict, state_dict=model.state_dict,
                      min_replica_size=args.replicas, use_async_quorum=False, replica_id=f"replica{replica_id}",
                      store_addr="127.0.0.1", store_port=store.port, rank=0, world_size=1,
                      lighthouse_addr=lighthouse, timeout=timedelta(seconds=120))
    share = order.shape[1] // args.replicas
    try:
        with DiLoCo(manager, [model], inner, outer, sync_every=args.inner_steps, pin_memory=False):
            for step in range(args.steps):
                x, y = train.get(order[step, replica_id * share:(replica_id + 1) * share])
                sweep.inner_step(model, inner, x, y, cfg.train, step)  # DiLoCo's hook syncs every H inner steps
        results.put((replica_id, sweep.evaluate(model, val), manager.current_step()))
    finally:
        manager.shutdown(wait=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, kind, default in (("steps", int, 600), ("batch-size", int, 32), ("seq-len", int, 64),
                                ("lr", float, 3e-3), ("warmup", int, 60), ("dim", int, 64), ("layers", int, 2),
                                ("seed", int, 1234), ("max-bytes", int, 4_000_000), ("replicas", int, 2),
                                ("inner-steps", int, 30), ("outer-lr", float, 1.0), ("outer-momentum", float, 0.5)):
        parser.add_argument(f"--{name}", type=kind, default=default)
    parser.add_argument("--flavour", default="debug")
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "torchft_peer.jsonl"))
    args = parser.parse_args()
    args.tokens, args.save_tokens = "", ""
    from torchft.coordination import LighthouseServer

    lighthouse = LighthouseServer(bind="[::]:0", min_replicas=args.replicas)
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    started = time.perf_counter()
    workers = [context.Process(target=replica, args=(r, args, lighthouse.address(), results))
               for r in range(args.replicas)]
    for worker in workers:
        worker.start()
    losses = sorted(results.get(timeout=3600) for _ in workers)
    for worker in workers:
        worker.join()
    lighthouse.shutdown()
    seconds = time.perf_counter() - started
    row = {"method": "torchft-diloco", **{k: v for k, v in vars(args).items() if k not in ("out", "tokens", "save_tokens")},
           "val_loss": losses[0][1], "val_losses": [loss for _, loss, _ in losses],
           "outer_syncs": losses[0][2], "seconds": round(seconds, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"torchft DiLoCo {args.replicas} replicas H {args.inner_steps} outer lr {args.outer_lr} momentum "
          f"{args.outer_momentum}: val loss {losses[0][1]:.4f} (replicas {[round(v, 4) for _, v, _ in losses]}), "
          f"{losses[0][2]} outer syncs, {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
