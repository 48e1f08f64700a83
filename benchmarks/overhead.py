"""Shoal's overhead against a minimal hand-written DDP script under torchrun, and the cost of
fault-tolerant mode against plain DDP, all with default settings (no thread or restart flags).

The same model (gpt 'debug'), data, batch and steps; rows: the hand-written loop (2 workers),
`shoal run` with 2 and 4 workers, `shoal run fault.enabled=true` with 2 and 4 workers. Each
repeat runs every row once, in turn, so drift on the machine hits them alike; a ratio is the
median of the per-repeat ratios. Reports steady-state samples/s, time from command start to
first step, and peak memory per worker; prints a table and writes benchmarks/out/overhead.json.

    .venv/bin/python benchmarks/overhead.py [--steps 300] [--repeats 3]
    .venv/bin/python benchmarks/overhead.py --hf [--quick]   # a Hugging Face GPT-2 on both sides
    .venv/bin/python benchmarks/overhead.py --rows 'torchrun + hand-written DDP,shoal run' --repeats 6

`--hf` trains an unchanged `transformers` GPT2LMHeadModel (built from a saved config, no
download) with `shoal run model.hf=FOLDER` and with the hand-written loop; the goal is
shoal >= 0.97x the hand-written loop's samples/s, as the median of per-pair ratios (each
pair run back to back).
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHOAL = str(Path(sys.executable).parent / "shoal")


def steady_rate(times: list[float], batch: int) -> float:
    """Samples/s over the second half of the steps (after warm-up)."""
    half = len(times) // 2
    return batch * (len(times) - 1 - half) / (times[-1] - times[half])


def run_shoal(workdir: Path, steps: int, batch: int, seq_len: int, *extra: str, hf: str = "") -> dict:
    # Without a config file `shoal run` starts from the quickstart (a 4-layer, 128-wide gpt): the rows pin
    # the debug flavour's own sizes (0), the model the hand-written loop builds.
    model = [f"model.hf={hf}"] if hf else ["model.name=gpt", "model.flavour=debug", "model.dim=0", "model.n_layers=0",
                                           "model.n_heads=0"]
    args = [SHOAL, "run", *model, f"train.steps={steps}", f"train.batch_size={batch}",
            f"data.seq_len={seq_len}", "train.eval_every=0", "checkpoint.every=0", "log.progress=off",
            "log.name=bench", "train.grad_clip=0", *extra]
    started = time.time()
    subprocess.run(args, cwd=workdir, check=True, capture_output=True)
    run = sorted((workdir / "runs").glob("bench*"), key=lambda p: p.stat().st_mtime)[-1]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    times = [r["time"] for r in records if r.get("kind") == "train"]
    peaks = [float(re.search(r"peak memory (\d+) MB", p.read_text()).group(1))
             for p in sorted((run / "logs").glob("rank*.log"))]
    parameters = re.search(r"model \S+: ([\d.]+M) parameters", (run / "logs" / "rank0.log").read_text()).group(1)
    if not hf and parameters != debug_gpt_parameters(seq_len):  # a row that trained another model compares nothing
        raise SystemExit(f"shoal run trained a {parameters}-parameter model, the hand-written loop "
                         f"{debug_gpt_parameters(seq_len)}: the rows are not the same model")
    return {"samples_per_s": steady_rate(times, batch), "first_step_s": times[0] - started, "peak_mb": peaks}


@functools.cache
def debug_gpt_parameters(seq_len: int) -> str:
    """The hand-written loop's model size as shoal's log writes it ("0.14M")."""
    from shoal.models.gpt import build_gpt
    return f"{sum(p.numel() for p in build_gpt(256, seq_len, 'debug').parameters()) / 1e6:.2f}M"


def run_torchrun(workdir: Path, steps: int, batch: int, seq_len: int, hf: str = "") -> dict:
    out = workdir / "handwritten.jsonl"
    started = time.time()
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    str(ROOT / "benchmarks" / "handwritten_ddp.py"), str(out), str(steps), str(batch), str(seq_len),
                    *([hf] if hf else [])],
                   cwd=workdir, check=True, capture_output=True)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    times = [r["time"] for r in records if "step" in r]
    return {"samples_per_s": steady_rate(times, batch), "first_step_s": times[0] - started,
            "peak_mb": records[-1]["peak_rss_mb"]}


ROWS = {  # name -> run(workdir, args, hf folder or "")
    "torchrun + hand-written DDP": lambda w, a, hf: run_torchrun(w, a.steps, a.batch, a.seq_len, hf),
    "shoal run": lambda w, a, hf: run_shoal(w, a.steps, a.batch, a.seq_len, "launch.nproc=2", hf=hf),
    "shoal run fault.enabled": lambda w, a, hf: run_shoal(w, a.steps, a.batch, a.seq_len, "launch.nproc=2",
                                                          "fault.enabled=true", hf=hf),
    "shoal run, 4 workers": lambda w, a, hf: run_shoal(w, a.steps, a.batch, a.seq_len, "launch.nproc=4", hf=hf),
    "shoal run fault.enabled, 4 workers": lambda w, a, hf: run_shoal(w, a.steps, a.batch, a.seq_len,
                                                                     "launch.nproc=4", "fault.enabled=true", hf=hf),
}
HF_ROWS = ("torchrun + hand-written DDP", "shoal run")  # --hf: the Hugging Face GPT-2 against its own loop
PAIRS = {  # ratio name -> (ours, baseline, goal)
    "shoal / hand-written, throughput": ("shoal run", "torchrun + hand-written DDP", ">= 0.97"),
    "shoal / hand-written, time to first step": ("shoal run", "torchrun + hand-written DDP", "<= 1.5"),
    "fault-tolerant / plain, throughput (2 workers)": ("shoal run fault.enabled", "shoal run", ">= 0.95"),
    "fault-tolerant / plain, throughput (4 workers)": ("shoal run fault.enabled, 4 workers", "shoal run, 4 workers",
                                                       ">= 0.95"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="")
    parser.add_argument("--hf", action="store_true", help="a Hugging Face GPT-2 instead of shoal's gpt")
    parser.add_argument("--quick", action="store_true", help="smoke run: 20 steps, 1 repeat, tiny GPT-2")
    parser.add_argument("--rows", default="", help="only these rows, comma-separated (e.g. 'torchrun + hand-written "
                                                   "DDP,shoal run' for the shoal / hand-written pair)")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repeats = 20, 1
    name = "overhead" + ("_hf" if args.hf else "") + ("_quick" if args.quick else "") + ("_rows" if args.rows else "")
    args.out = args.out or str(ROOT / "benchmarks" / "out" / f"{name}.json")
    wanted = [name.strip() for name in args.rows.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in ROWS]
    if unknown:
        parser.error(f"--rows: no row named {unknown[0]!r}; the rows are: {', '.join(ROWS)}")
    rows = {name: run for name, run in ROWS.items()
            if (not args.hf or name in HF_ROWS) and (not wanted or name in wanted)}
    results: dict[str, list[dict]] = {name: [] for name in rows}
    with tempfile.TemporaryDirectory() as tmp:
        hf = hf_folder(Path(tmp) / "gpt2", args.quick, args.seq_len) if args.hf else ""
        for repeat in range(args.repeats):  # every row once per repeat, in turn
            for row, (name, run) in enumerate(rows.items()):
                workdir = Path(tmp) / f"repeat{repeat}-row{row}"
                workdir.mkdir()
                results[name].append(run(workdir, args, hf))
    summary = {name: {"samples_per_s": statistics.median(r["samples_per_s"] for r in runs),
                      "first_step_s": statistics.median(r["first_step_s"] for r in runs),
                      "peak_mb_per_worker": max(max(r["peak_mb"]) for r in runs), "runs": runs}
               for name, runs in results.items()}
    ratios = {}
    for label, (ours, base, goal) in PAIRS.items():
        if ours not in results or base not in results:
            continue
        key = "first_step_s" if "first step" in label else "samples_per_s"
        pairs = [a[key] / b[key] for a, b in zip(results[ours], results[base])]
        ratios[label] = {"median": statistics.median(pairs), "pairs": pairs, "goal": goal}
    print(f"model: {'transformers GPT2LMHeadModel' if args.hf else 'shoal gpt debug'}")
    print(f"{'launcher':<38} {'samples/s':>10} {'first step (s)':>15} {'peak MB/worker':>15}")
    for name, s in summary.items():
        print(f"{name:<38} {s['samples_per_s']:>10.0f} {s['first_step_s']:>15.2f} {s['peak_mb_per_worker']:>15.0f}")
    print()
    for label, r in ratios.items():
        pairs = ", ".join(f"{p:.2f}" for p in r["pairs"])
        print(f"{label:<48} {r['median']:.3f}x (goal {r['goal']}; pairs {pairs})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"config": vars(args), "summary": summary, "ratios": ratios}, indent=1))


def hf_folder(folder: Path, quick: bool, seq_len: int) -> str:
    """A saved GPT-2 config (no weights: each side initialises it from the config)."""
    import transformers
    size = dict(n_embd=32, n_layer=2, n_head=4) if quick else dict(n_embd=256, n_layer=4, n_head=4)
    transformers.GPT2Config(vocab_size=256, n_positions=seq_len, bos_token_id=0, eos_token_id=0,
                            architectures=["GPT2LMHeadModel"], **size).save_pretrained(folder)
    return str(folder)


if __name__ == "__main__":
    main()
