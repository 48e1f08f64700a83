"""Federated benchmarks: simulation against Flower, robustness to poisoning, privacy against utility.

    python benchmarks/federated.py                        # everything measurable here
    python benchmarks/federated.py --only sim --clients 100
    python benchmarks/federated.py --only fedbuff
    FLOWER_PYTHON=/path/to/venv/bin/python python benchmarks/federated.py --only sim

* sim: `shoal fed simulate` and Flower's Ray simulation (flwr[simulation] installed in its own
  environment, given by --flower-python / FLOWER_PYTHON) on the same MLP, the same digits split
  (scikit-learn's bundled 8x8 digits, IID over N clients), the same local training code
  (shoal.federated.local.train_local) and rounds. Wall time of the whole command, and peak
  memory summed over its process tree (RSS and PSS, sampled every 0.2 s from /proc).
* robust: 10% of the clients send sign-flipped updates scaled x10; FedAvg vs Krum/MultiKrum,
  trimmed mean and median against the clean FedAvg run.
* privacy: accuracy against epsilon for the hospitals example (central DP, fixed clipping).
* fedbuff: a real FedBuff server over mutual TLS with one fast and two slow sites: the share of
  buffered updates the fast site supplies with and without `federated.buffer_per_site`.

Prints a table per part and writes benchmarks/out/federated.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out" / "federated.json"
sys.path.insert(0, str(ROOT))

SIM_CONFIG = """
[model]
name = "mlp"
dim = 64
n_layers = 1
[train]
optimizer = "sgd"
lr = 0.1
batch_size = 16
weight_decay = 0.0
grad_clip = 0.0
seed = 1234
[federated]
rounds = {rounds}
fraction = 1.0
min_clients = 2
local_epochs = 2
sim_data = "digits"
partition = "iid"
sim_workers = 2
[log]
dir = "{runs}"
name = "sim{clients}"
"""

# Flower's side: the same data, split, model and local training, inside Flower's Ray simulation.
FLOWER_SCRIPT = textwrap.dedent('''
    import json, sys, warnings
    warnings.filterwarnings("ignore")
    import numpy as np, torch
    from flwr.client import ClientApp, NumPyClient
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.simulation import run_simulation
    from shoal.config import load
    from shoal.data.spec import DataSpec
    from shoal.federated.local import evaluate, train_local
    from shoal.federated.partition import load_sim_data, partition
    from shoal.models import build_model

    args = json.loads(sys.argv[1])
    cfg = load(args["config"])
    x, y, xt, yt = load_sim_data(cfg)
    spec = DataSpec(kind="classes", in_features=x.shape[1], num_classes=10)
    parts = partition(y.numpy(), args["clients"], "iid", seed=cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    template = build_model(cfg.model, spec)
    keys = list(template.state_dict())

    def set_weights(model, arrays):
        model.load_state_dict({k: torch.from_numpy(np.asarray(a)) for k, a in zip(keys, arrays)})

    def get_weights(model):
        return [v.detach().numpy().copy() for v in model.state_dict().values()]

    class Client(NumPyClient):
        def __init__(self, cid):
            self.cid = cid
        def fit(self, parameters, config):
            torch.set_num_threads(1)
            model = build_model(cfg.model, spec)
            set_weights(model, parameters)
            ids = torch.from_numpy(parts[self.cid])
            g = torch.Generator().manual_seed(self.cid)
            metrics = train_local(model, x[ids], y[ids], cfg, {"local_epochs": cfg.federated.local_epochs}, g)
            return get_weights(model), len(ids), metrics

    def client_fn(context: Context):
        return Client(int(context.node_config["partition-id"])).to_client()

    result = {}
    def evaluate_fn(rnd, parameters, config):
        model = build_model(cfg.model, spec)
        set_weights(model, parameters)
        m = evaluate(model, xt, yt)
        result.update(m, round=rnd)
        with open(args["out"], "w") as fh:
            json.dump(result, fh)
        return m["loss"], m

    def server_fn(context: Context):
        strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=2, min_available_clients=2,
                          evaluate_fn=evaluate_fn, initial_parameters=ndarrays_to_parameters(get_weights(template)))
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=cfg.federated.rounds))

    run_simulation(server_app=ServerApp(server_fn=server_fn), client_app=ClientApp(client_fn=client_fn),
                   num_supernodes=args["clients"],
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
''')


def tree_memory(root_pid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes summed over root_pid and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    rss = pss = 0
    stack = [root_pid]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
        except OSError:
            continue
    return rss, pss


def measure(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> dict:
    """Run a command; wall time, peak tree memory, exit code."""
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    peak_rss = peak_pss = 0
    output: list[bytes] = []
    import threading

    reader = threading.Thread(target=lambda: output.append(proc.stdout.read()), daemon=True)
    reader.start()
    while proc.poll() is None:
        rss, pss = tree_memory(proc.pid)
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        if time.monotonic() - started > timeout:
            os.killpg(proc.pid, 9)
            proc.wait()
            return {"status": f"timeout after {timeout:.0f}s", "seconds": timeout}
        time.sleep(0.2)
    reader.join(timeout=5)
    text = b"".join(output).decode(errors="replace")
    return {"status": "ok" if proc.returncode == 0 else f"exit {proc.returncode}: {text[-600:]}",
            "seconds": time.monotonic() - started, "peak_rss_mb": peak_rss / 2 ** 20,
            "peak_pss_mb": peak_pss / 2 ** 20, "log": text}


def bench_sim(clients_list: list[int], rounds: int, flower_python: str, timeout: float, work: Path) -> list[dict]:
    rows = []
    for clients in clients_list:
        config = work / f"sim{clients}.toml"
        config.write_text(SIM_CONFIG.format(rounds=rounds, runs=work / "runs", clients=clients))
        shoal = measure([sys.executable, "-m", "shoal.federated", "fed", "simulate", str(config), "--clients",
                         str(clients)], timeout)
        metrics_file = work / "runs" / f"sim{clients}" / "metrics.jsonl"
        if shoal["status"] == "ok":
            last = json.loads(metrics_file.read_text().splitlines()[-1])
            shoal["accuracy"] = last["eval_accuracy"]
        shoal.pop("log", None)
        rows.append({"framework": "shoal", "clients": clients, "rounds": rounds, **shoal})
        if flower_python and Path(flower_python).exists():
            script, out = work / "flower_sim.py", work / f"flower{clients}.json"
            script.write_text(FLOWER_SCRIPT)
            env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_DEDUP_LOGS": "0"}
            flower = measure([flower_python, str(script), json.dumps({"config": str(config), "clients": clients,
                                                                     "out": str(out)})], timeout, env)
            if out.exists():
                result = json.loads(out.read_text())
                if result.get("round") == rounds:
                    flower["accuracy"] = result["accuracy"]
            flower.pop("log", None)
            rows.append({"framework": "flower", "clients": clients, "rounds": rounds, **flower})
        else:
            rows.append({"framework": "flower", "clients": clients, "rounds": rounds,
                         "status": "not measured: no Flower interpreter (set --flower-python or FLOWER_PYTHON)"})
    return rows


def bench_robust(work: Path) -> list[dict]:
    from shoal.config import load
    from shoal.federated.simulate import simulate

    base = ["model.name=mlp", "model.dim=64", "model.n_layers=1", "train.optimizer=sgd", "train.lr=0.1",
            "train.batch_size=16", "train.weight_decay=0.0", "federated.rounds=5", "federated.local_epochs=2",
            "federated.sim_clients=50", "federated.sim_workers=2", "federated.partition=iid"]
    runs = [("fedavg", "clean", 0.0, []), ("fedavg", "attacked", 0.1, []),
            ("krum", "attacked", 0.1, ["federated.byzantine=5", "federated.min_clients=14"]),
            ("multikrum", "attacked", 0.1, ["federated.byzantine=5", "federated.min_clients=14"]),
            ("fedtrimmedavg", "attacked", 0.1, ["federated.trim_fraction=0.2"]),
            ("fedmedian", "attacked", 0.1, [])]
    rows = []
    for strategy, setting, fraction, extra in runs:
        cfg = load(None, base + [f"federated.strategy={strategy}"] + extra)
        run_dir = work / "robust" / f"{strategy}-{setting}"
        run_dir.mkdir(parents=True, exist_ok=True)
        summary = simulate(cfg, run_dir, attack_fraction=fraction, attack_scale=10.0)
        rows.append({"strategy": strategy, "setting": setting, "attackers": summary["attackers"],
                     "accuracy": summary["eval_accuracy"], "seconds": summary["total_seconds"]})
    clean = rows[0]["accuracy"]
    for row in rows:
        row["vs_clean"] = row["accuracy"] - clean
    return rows


FEDBUFF_CONFIG = """
[model]
name = "mlp"
dim = 16
n_layers = 1
[train]
optimizer = "sgd"
lr = 0.1
batch_size = 16
weight_decay = 0.0
grad_clip = 0.0
[data]
val_fraction = 0.25
[federated]
in_features = 6
num_classes = 2
certs_dir = "{certs}"
address = "127.0.0.1:0"
strategy = "fedbuff"
rounds = {versions}
buffer_size = 3
buffer_per_site = {per_site}
min_clients = 3
round_timeout = 60
[log]
dir = "{runs}"
name = "{name}"
"""


def bench_fedbuff(work: Path, versions: int = 12) -> list[dict]:
    """A real FedBuff server over mutual TLS with one fast site (40 rows) and two slow ones (6,000 rows
    each), in this process: who fills the buffers with and without the per-site share."""
    import threading

    import numpy as np

    from shoal.config import load
    from shoal.federated import certs
    from shoal.federated.client import FederatedClient
    from shoal.federated.rounds import RoundDriver
    from shoal.federated.server import start_grpc

    sites = {"fast": 40, "slow1": 6000, "slow2": 6000}
    certs.make_all(work / "fedbuff-certs", list(sites))
    rng = np.random.default_rng(0)
    for name, rows in sites.items():
        x = rng.normal(size=(rows, 6)).astype(np.float32)
        (work / name).mkdir(parents=True, exist_ok=True)
        np.save(work / name / "x.npy", x)
        np.save(work / name / "y.npy", (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64))
    results = []
    for label, per_site in (("no share (buffer_per_site = 3)", 3), ("fair share (default)", 0)):
        name = f"fedbuff{per_site}"
        path = work / f"{name}.toml"
        path.write_text(FEDBUFF_CONFIG.format(certs=work / "fedbuff-certs", runs=work / "runs", name=name,
                                              versions=versions, per_site=per_site))
        cfg = load(path)
        run_dir = work / "runs" / name
        run_dir.mkdir(parents=True)
        driver = RoundDriver(cfg, run_dir)
        server, port = start_grpc(cfg, driver, name)
        for site in sites:
            client = FederatedClient(cfg, str(work / site), f"127.0.0.1:{port}", site)
            threading.Thread(target=client.run, args=(60.0,), daemon=True).start()
        started = time.monotonic()
        try:
            final = driver.run()
        finally:
            driver.mailbox.stop()
            server.stop(1.0)
        seconds = time.monotonic() - started
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        buffered = sum(r["answered"] for r in rows)
        fast = sum(r["sites"].get("fast", 0) for r in rows)
        results.append({"setting": label, "versions": versions, "buffered": buffered, "from_fast": fast,
                        "fast_share": fast / buffered, "max_fast_per_buffer": max(r["sites"].get("fast", 0)
                                                                                 for r in rows),
                        "seconds": seconds, "accuracy": final.get("accuracy", float("nan")),
                        "accuracy_median": final.get("accuracy_median", float("nan"))})
    return results


def bench_privacy(work: Path) -> list[dict]:
    from shoal.config import load
    from shoal.federated.simulate import simulate

    rows = []
    for noise in (0.0, 0.3, 0.6, 1.0, 2.0):
        dp = ["federated.dp=off"] if noise == 0 else ["federated.dp=fixed", f"federated.dp_noise={noise}"]
        cfg = load(ROOT / "examples" / "hospitals" / "config.toml",
                   ["federated.secagg=false", "federated.sim_clients=5", "federated.sim_workers=2"] + dp)
        run_dir = work / "privacy" / f"z{noise}"
        run_dir.mkdir(parents=True, exist_ok=True)
        summary = simulate(cfg, run_dir)
        rows.append({"noise_multiplier": noise, "epsilon": summary.get("epsilon", float("inf")),
                     "delta": cfg.federated.dp_delta, "rounds": cfg.federated.rounds,
                     "accuracy": summary["eval_accuracy"]})
    return rows


def table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v).splitlines()[0][:70] if str(v) else ""
    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="sim,robust,privacy", help="comma-separated parts to run")
    parser.add_argument("--clients", default="100,1000", help="client counts for the simulation part")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--flower-python", default=os.environ.get("FLOWER_PYTHON", "/work/flwr-venv/bin/python"),
                        help="interpreter of an environment with flwr[simulation]")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed per simulation run")
    args = parser.parse_args()
    parts = set(args.only.split(","))
    results: dict = json.loads(OUT.read_text()) if OUT.exists() else {}
    results["machine"] = {"cpus": os.cpu_count(), "load_at_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "sim" in parts:
            rows = bench_sim([int(c) for c in args.clients.split(",")], args.rounds, args.flower_python,
                             args.timeout, work)
            # a new row replaces the old one for the same framework and clients, unless it measured nothing
            fresh = [r for r in rows if not r["status"].startswith("not measured")]
            replaced = {(r["framework"], r["clients"]) for r in fresh}
            kept = [r for r in results.get("simulation", []) if (r["framework"], r["clients"]) not in replaced]
            kept += [r for r in rows if r not in fresh and (r["framework"], r["clients"]) not in
                     {(k["framework"], k["clients"]) for k in kept}]
            results["simulation"] = sorted(kept + fresh, key=lambda r: (r["clients"], r["framework"]))
            print("\nSimulation: FedAvg, MLP on digits (IID), same local training\n")
            print(table(rows, ["framework", "clients", "rounds", "seconds", "peak_rss_mb", "peak_pss_mb",
                               "accuracy", "status"]))
        if "robust" in parts:
            rows = bench_robust(work)
            results["robustness"] = rows
            print("\nRobustness: 10% of 50 clients send sign-flipped updates x10 (5 rounds)\n")
            print(table(rows, ["strategy", "setting", "attackers", "accuracy", "vs_clean", "seconds"]))
        if "fedbuff" in parts:
            rows = bench_fedbuff(work)
            results["fedbuff"] = rows
            print("\nFedBuff: one fast site (40 rows) and two slow ones (6,000 rows), buffer_size 3, real server "
                  "over mutual TLS\n")
            print(table(rows, ["setting", "versions", "buffered", "from_fast", "fast_share", "max_fast_per_buffer",
                               "seconds", "accuracy", "accuracy_median"]))
        if "privacy" in parts:
            rows = bench_privacy(work)
            results["privacy"] = rows
            print("\nPrivacy/utility: hospitals example, central DP with fixed clipping (simulated)\n")
            print(table(rows, ["noise_multiplier", "epsilon", "delta", "rounds", "accuracy"]))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwrote {OUT}")


if __name__ == "__main__":
    main()
