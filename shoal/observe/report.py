"""`shoal report RUN_DIR`: a loss/throughput plot (PNG) and a short summary of a run."""

from __future__ import annotations

import statistics
from pathlib import Path

from shoal.observe.metrics import read_metrics


def summarize(run_dir: Path) -> dict:
    records = read_metrics(run_dir)
    train = [r for r in records if r.get("kind", "train") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    if not train:
        raise ValueError(f"{run_dir}/metrics.jsonl has no training steps yet")
    steady = train[len(train) // 5:] or train  # skip warm-up steps (allocation, first collectives)
    rate_key = "tokens_per_second" if "tokens_per_second" in train[0] else "samples_per_second"
    step_s = statistics.median(r["step_seconds"] for r in steady)
    comm_s = statistics.median(r.get("comm_seconds", 0.0) for r in steady)
    data_s = statistics.median(r.get("data_seconds", 0.0) for r in steady)  # time in train_set.get (the loader)
    return {
        "run": str(run_dir), "steps": train[-1]["step"], "first_loss": train[0]["loss"],
        "final_loss": train[-1]["loss"], "final_val_loss": evals[-1]["val_loss"] if evals else None,
        "throughput_unit": rate_key.replace("_per_second", "/s"),
        "throughput": statistics.median(r[rate_key] for r in steady),
        "step_seconds": step_s, "comm_seconds": comm_s, "data_seconds": data_s,
        "compute_seconds": max(0.0, step_s - comm_s - data_s),
        "wall_seconds": train[-1]["time"] - train[0]["time"] + train[0]["step_seconds"],
    }


def plot(run_dir: Path, out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [r for r in records if r.get("kind", "train") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    rate_key = "tokens_per_second" if "tokens_per_second" in train[0] else "samples_per_second"
    fig, (ax_loss, ax_rate, ax_time) = plt.subplots(1, 3, figsize=(15, 4))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation")
    ax_loss.set(xlabel="step", ylabel="loss", title="Loss")
    ax_loss.legend()
    ax_rate.plot([r["step"] for r in train], [r[rate_key] for r in train])
    ax_rate.set(xlabel="step", ylabel=rate_key.replace("_", " "), title="Throughput")
    steps = [r["step"] for r in train]
    data = [r.get("data_seconds", 0.0) * 1000 for r in train]
    comm = [r.get("comm_seconds", 0.0) * 1000 for r in train]
    compute = [max(0.0, r["step_seconds"] * 1000 - d - c) for r, d, c in zip(train, data, comm)]
    ax_time.stackplot(steps, data, comm, compute, labels=["data (loader wait)", "communication", "compute"])
    ax_time.set(xlabel="step", ylabel="ms", title="Time per step")
    ax_time.legend(loc="upper right", fontsize="small")
    fig.suptitle(Path(run_dir).name)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def write_report(run_dir: Path) -> tuple[dict, Path]:
    run_dir = Path(run_dir)
    summary = summarize(run_dir)
    png = plot(run_dir, run_dir / "report.png")
    lines = [f"# Run {run_dir.name}", "",
             f"- steps: {summary['steps']}",
             f"- loss: {summary['first_loss']:.4f} -> {summary['final_loss']:.4f}"
             + (f" (validation {summary['final_val_loss']:.4f})" if summary["final_val_loss"] is not None else ""),
             f"- throughput: {summary['throughput']:,.0f} {summary['throughput_unit']} (median, steady state)",
             f"- time per step: {summary['step_seconds'] * 1000:.1f} ms; waiting for data "
             f"{summary['data_seconds'] * 1000:.1f} ms; gradient all-reduce {summary['comm_seconds'] * 1000:.1f} ms "
             f"(overlaps backward); the rest compute {summary['compute_seconds'] * 1000:.1f} ms",
             f"- wall time: {summary['wall_seconds']:.1f} s", "", f"![loss, throughput and time per step]({png.name})", ""]
    (run_dir / "report.md").write_text("\n".join(lines))
    return summary, png
