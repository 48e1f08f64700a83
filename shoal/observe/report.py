"""`shoal report RUN_DIR`: what happened in a run, as report.png and report.md.

A training run (metrics.jsonl of `train`, `eval`, `ranks` and `event` records, see
docs/observe.md) gets five panels: the loss (raw faint, smoothed solid) with its events
drawn where they happened, validation loss against tokens (or samples) seen, throughput
with the world size over time, where each step's time went (data wait, compute, the
exposed wait for the gradient exchange, the rest), and each rank's compute per timing
window, which shows a straggler. A federated run (`round` records) gets its rounds: the
accuracy with the per-site spread, and the loss. report.md lists the events in words
("2 workers lost, 2 replaced, median recovery 0.13 s").
"""

from __future__ import annotations

import bisect
import statistics
from collections import Counter
from pathlib import Path

from shoal.observe.events import events_of
from shoal.observe.metrics import read_metrics

# How each event is drawn on the curves: colour, line style, label. Frequent, routine events
# (checkpoints, outer syncs) are short ticks at the bottom rather than lines across.
EVENT_STYLE = {
    "died": ("tab:red", "-", "worker died"),
    "left": ("tab:orange", ":", "worker left"),
    "joined": ("tab:green", ":", "worker joined"),
    "regrouped": ("tab:green", "--", "regrouped"),
    "preempted": ("black", "-", "preempted"),
    "resumed": ("black", "--", "resumed"),
    "straggler": ("tab:purple", "-.", "straggler named"),
}
TICK_EVENTS = {"checkpoint": ("tab:gray", "checkpoint"), "outer_sync": ("tab:cyan", "outer sync")}


def smooth(values: list[float], weight: float | None = None) -> list[float]:
    """Exponential moving average, debiased as TensorBoard's smoothing is (no pull toward 0
    at the start); the weight grows with the length so ~1/20 of the curve is averaged."""
    if weight is None:
        weight = min(0.98, max(0.0, 1 - 20 / max(len(values), 1)))
    out, average, norm = [], 0.0, 0.0
    for value in values:
        average = weight * average + (1 - weight) * value
        norm = weight * norm + (1 - weight)
        out.append(average / norm)
    return out


def _kinds(records: list[dict]) -> dict[str, list[dict]]:
    kinds: dict[str, list[dict]] = {"train": [], "eval": [], "ranks": [], "event": [], "round": []}
    for r in records:
        kind = "round" if "round" in r and "kind" not in r else r.get("kind", "train")
        kinds.setdefault(kind, []).append(r)
    return kinds


def event_step(event: dict, train: list[dict]) -> float:
    """Where an event sits on the step axis: from its time, between the steps that ended around
    it (the launcher's own step count lags the workers')."""
    times = [r["time"] for r in train]
    if not times or "time" not in event:
        return float(event.get("step", 0))
    i = bisect.bisect_left(times, event["time"])
    if i == 0:
        return float(train[0]["step"]) - 1
    if i == len(times):
        return float(train[-1]["step"])
    before, after = train[i - 1], train[i]
    span = max(after["time"] - before["time"], 1e-9)
    return before["step"] + (after["step"] - before["step"]) * (event["time"] - before["time"]) / span


def event_summary(events: list[dict]) -> list[str]:
    """Events in words, one line each, for report.md."""
    counts = Counter(e["event"] for e in events)
    lines = []
    if counts["died"] or counts["replaced"]:
        causes = Counter(e.get("signal") or f"exit code {e.get('code')}" for e in events if e["event"] == "died")
        recoveries = [e["recovery_seconds"] for e in events if e["event"] == "regrouped" and "recovery_seconds" in e]
        line = f"{counts['died']} worker{'s' if counts['died'] != 1 else ''} lost ({', '.join(f'{n} {c}' for c, n in causes.items())}), " \
               f"{counts['replaced']} replaced"
        if recoveries:
            line += f", median recovery {statistics.median(recoveries):.2f} s (max {max(recoveries):.2f} s)"
        lines.append(line)
    regroups = [e for e in events if e["event"] == "regrouped"]
    if regroups:
        sizes = " -> ".join(str(e["size"]) for e in regroups)
        lines.append(f"{len(regroups)} generations formed; world size {sizes}; "
                     f"{counts['joined']} joins, {counts['left']} leaves")
    for e in events:
        if e["event"] == "straggler":
            lines.append(f"straggler from step {e['step']}: rank {e['rank']} computes {1 + e['slower']:.1f}x as long "
                         f"as the others' median before the gradient exchange")
        elif e["event"] in ("preempted", "resumed"):
            lines.append(f"{e['event']} at step {e['step']}" + (f" ({e['signal']})" if e.get("signal") else ""))
    if counts["checkpoint"]:
        seconds = [e.get("seconds", 0.0) for e in events if e["event"] == "checkpoint"]
        lines.append(f"{counts['checkpoint']} checkpoints written (median {statistics.median(seconds) * 1000:.0f} ms "
                     f"of training blocked)")
    if counts["outer_sync"]:
        seconds = [e.get("seconds", 0.0) for e in events if e["event"] == "outer_sync"]
        lines.append(f"{counts['outer_sync']} outer syncs logged (median {statistics.median(seconds) * 1000:.1f} ms)")
    return lines


def summarize(run_dir: Path) -> dict:
    kinds = _kinds(read_metrics(run_dir))
    train, evals = kinds["train"], kinds["eval"]
    if not train:
        raise ValueError(f"{run_dir}/metrics.jsonl has no training steps yet")
    steady = train[len(train) // 5:] or train  # skip warm-up steps (allocation, first collectives)
    rate_key = "tokens_per_second" if "tokens_per_second" in train[0] else "samples_per_second"
    step_s = statistics.median(r["step_seconds"] for r in steady)
    comm_s = statistics.median(r.get("comm_seconds", 0.0) for r in steady)
    data_s = statistics.median(r.get("data_seconds", 0.0) for r in steady)  # time in train_set.get (the loader)
    compute_s = statistics.median(r["compute_seconds"] for r in steady) if "compute_seconds" in steady[0] \
        else max(0.0, step_s - comm_s - data_s)
    named = [e["rank"] for e in kinds["event"] if e.get("event") == "straggler"]
    return {
        "run": str(run_dir), "steps": train[-1]["step"], "first_loss": train[0]["loss"],
        "final_loss": train[-1]["loss"], "final_val_loss": evals[-1]["val_loss"] if evals else None,
        "throughput_unit": rate_key.replace("_per_second", "/s"),
        "throughput": statistics.median(r[rate_key] for r in steady),
        "step_seconds": step_s, "comm_seconds": comm_s, "data_seconds": data_s, "compute_seconds": compute_s,
        "wall_seconds": train[-1]["time"] - train[0]["time"] + train[0]["step_seconds"],
        "events": event_summary(kinds["event"]),
        "slowest_rank": Counter(named).most_common(1)[0][0] if named else None,
    }


def _draw_events(ax, events: list[dict], train: list[dict], seen: set[str]) -> None:
    for e in events:
        if e.get("gen") == 1:  # the first generation forming is the start, not an event on the curve
            continue
        x = event_step(e, train)
        if e["event"] in EVENT_STYLE:
            colour, style, label = EVENT_STYLE[e["event"]]
            ax.axvline(x, color=colour, linestyle=style, linewidth=1, alpha=0.8,
                       label=None if label in seen else label)
            seen.add(label)
        elif e["event"] in TICK_EVENTS:
            colour, label = TICK_EVENTS[e["event"]]
            ax.plot([x], [0.0], marker="|", markersize=12, color=colour, transform=ax.get_xaxis_transform(),
                    linestyle="none", label=None if label in seen else label, clip_on=False)
            seen.add(label)


def _seen_axis(train: list[dict]) -> tuple[str, list[tuple[int, float]]]:
    """(unit, [(step, tokens or samples seen by then)]) from the train records' rates."""
    rate_key = "tokens_per_second" if "tokens_per_second" in train[0] else "samples_per_second"
    seen, total = [], 0.0
    for r in train:
        total += r[rate_key] * r["step_seconds"]  # the step's batch, in tokens or samples
        seen.append((r["step"], total))
    return rate_key.replace("_per_second", ""), seen


def plot(run_dir: Path, out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = _kinds(read_metrics(run_dir))
    if not kinds["train"] and kinds["round"]:
        return plot_federated(kinds["round"], out, Path(run_dir).resolve().name)
    train, evals, ranks, events = kinds["train"], kinds["eval"], kinds["ranks"], kinds["event"]
    steps = [r["step"] for r in train]
    fig, axes = plt.subplots(2, 3, figsize=(16, 8))
    ax_loss, ax_val, ax_rate, ax_time, ax_ranks, ax_text = axes.flat

    losses = [r["loss"] for r in train]
    ax_loss.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8)
    ax_loss.plot(steps, smooth(losses), color="tab:blue", label="train (smoothed)")
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", color="tab:orange",
                     label="validation")
    _draw_events(ax_loss, events, train, set())
    ax_loss.set(xlabel="step", ylabel="loss", title="Loss, with the run's events")
    ax_loss.legend(fontsize="x-small", loc="upper right")

    unit, seen = _seen_axis(train)
    by_step = dict(seen)
    if evals:
        ax_val.plot([by_step.get(r["step"], 0.0) for r in evals], [r["val_loss"] for r in evals], "o-",
                    color="tab:orange")
        ax_val.set(title="Validation loss against data seen")
    else:
        ax_val.plot([s for _, s in seen], smooth(losses), color="tab:blue")
        ax_val.set(title="Training loss (smoothed) against data seen (no evaluation)")
    ax_val.set(xlabel=f"{unit} seen", ylabel="loss")

    rate_key = f"{unit}_per_second"
    rates = [r[rate_key] for r in train]
    ax_rate.plot(steps, rates, color="tab:green", alpha=0.25, linewidth=0.8)
    ax_rate.plot(steps, smooth(rates), color="tab:green", label="smoothed")
    ax_rate.set(xlabel="step", ylabel=rate_key.replace("_", " "), title="Throughput and world size")
    if any("world_size" in r for r in train):
        ax_size = ax_rate.twinx()
        ax_size.step(steps, [r.get("world_size", 0) for r in train], where="post", color="black", alpha=0.6,
                     linewidth=1)
        ax_size.set_ylabel("data-parallel workers")
        ax_size.set_ylim(0, max(r.get("world_size", 1) for r in train) + 1)
    _draw_events(ax_rate, [e for e in events if e["event"] in ("died", "regrouped")], train, set())

    data = smooth([r.get("data_seconds", 0.0) * 1000 for r in train])
    comm = smooth([r.get("comm_seconds", 0.0) * 1000 for r in train])
    compute = smooth([r.get("compute_seconds", max(0.0, r["step_seconds"] - r.get("comm_seconds", 0.0)
                                                    - r.get("data_seconds", 0.0))) * 1000 for r in train])
    total = smooth([r["step_seconds"] * 1000 for r in train])
    rest = [max(0.0, t - d - c - k) for t, d, c, k in zip(total, data, comm, compute)]
    ax_time.stackplot(steps, data, compute, comm, rest,
                      labels=["data (loader wait)", "compute (to the gradient exchange)",
                              "waiting for the exchange / outer sync", "optimizer and the rest"],
                      colors=["tab:olive", "tab:blue", "tab:red", "tab:gray"], alpha=0.8)
    ax_time.set(xlabel="step", ylabel="ms (smoothed)", title="Time per step (logging rank)")
    ax_time.legend(loc="upper right", fontsize="x-small")

    if ranks:
        _plot_ranks(ax_ranks, ranks, summary_named(events))
    else:
        ax_ranks.set_axis_off()
        ax_ranks.text(0.5, 0.5, "no per-rank timing records", ha="center", va="center")
    ax_text.set_axis_off()
    summary = summarize(run_dir)
    words = summary["events"] or ["no events besides training"]
    ax_text.text(0.0, 1.0, "\n".join(_wrap(line) for line in words), va="top", ha="left", fontsize=9,
                 family="monospace", transform=ax_text.transAxes)
    ax_text.set_title("Events")
    fig.suptitle(Path(run_dir).name)
    fig.tight_layout()
    fig.savefig(out, dpi=72)
    plt.close(fig)
    return out


def _wrap(line: str, width: int = 58) -> str:
    import textwrap
    return "\n".join(textwrap.wrap(line, width)) or line


def summary_named(events: list[dict]) -> str | None:
    """The rank named a straggler most often (shoal/observe/ranks.py's rule), or None."""
    named = Counter(e["rank"] for e in events if e.get("event") == "straggler")
    return named.most_common(1)[0][0] if named else None


def _plot_ranks(ax, ranks: list[dict], worst: str | None) -> None:
    """Each rank's median compute per window; a rank named a straggler drawn thick."""
    labelled = [r for r in ranks if "per_rank" in r]
    names = sorted({name for r in labelled for name in r["per_rank"]["rank"]}, key=lambda n: (len(n), n))
    for name in names:
        xs, ys = [], []
        for r in labelled:
            if name in r["per_rank"]["rank"]:
                xs.append(r["step"])
                ys.append(r["per_rank"]["compute"][r["per_rank"]["rank"].index(name)] * 1000)
        ax.plot(xs, ys, marker=".", linewidth=2.5 if name == worst else 1,
                label=f"rank {name}" + (" (straggler)" if name == worst else ""))
    if not labelled:  # too many ranks to list: the spread
        xs = [r["step"] for r in ranks]
        ax.fill_between(xs, [r["compute_min"] * 1000 for r in ranks], [r["compute_max"] * 1000 for r in ranks],
                        alpha=0.3, label="min-max")
        ax.plot(xs, [r["compute_median"] * 1000 for r in ranks], label="median")
    ax.set(xlabel="step", ylabel="ms to reach the gradient exchange",
           title="Per-rank compute (median per window)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize="x-small", loc="upper right", ncol=2)


def plot_federated(rounds: list[dict], out: Path, name: str) -> Path:
    """A federated run: accuracy per round with the spread over the sites, and the losses."""
    import matplotlib.pyplot as plt

    xs = [r["round"] for r in rounds]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(12, 4))
    metric = next((m for m in ("accuracy", "acc") if f"eval_{m}" in rounds[-1]), None)
    if metric is not None:
        ax_acc.plot(xs, [r.get(f"eval_{metric}") for r in rounds], "o-", label="weighted mean over sites")
        spread = _spread_prefix(rounds[-1], metric)
        if spread is not None:
            ax_acc.fill_between(xs, [r.get(f"{spread}_min") for r in rounds], [r.get(f"{spread}_max") for r in rounds],
                                alpha=0.25, label="site min-max")
            ax_acc.plot(xs, [r.get(f"{spread}_median") for r in rounds], "--", label="site median")
        ax_acc.set(xlabel="round", ylabel=metric, title="Accuracy per round, spread over sites")
        ax_acc.legend(fontsize="small", loc="lower right")
    if any("epsilon" in r for r in rounds):  # the privacy spent so far, beside what it bought
        ax_eps = ax_acc.twinx()
        ax_eps.plot([r["round"] for r in rounds if "epsilon" in r], [r["epsilon"] for r in rounds if "epsilon" in r],
                    color="tab:gray", linestyle=":", label="DP epsilon")
        ax_eps.set_ylabel("epsilon (central DP)")
        ax_eps.legend(fontsize="small", loc="center right")
    for key, label in (("train_loss", "training (mean over sites)"), ("eval_loss", "evaluation")):
        if any(key in r for r in rounds):
            ax_loss.plot([r["round"] for r in rounds if key in r], [r[key] for r in rounds if key in r], "o-",
                         label=label)
    ax_loss.set(xlabel="round", ylabel="loss", title="Loss per round")
    ax_loss.legend(fontsize="small")
    fig.suptitle(name)
    fig.tight_layout()
    fig.savefig(out, dpi=72)
    plt.close(fig)
    return out


def _spread_prefix(row: dict, metric: str) -> str | None:
    """The prefix of a metric's per-site median/min/max in a round row (`eval_accuracy_min`), or None."""
    return next((p for p in (f"eval_{metric}", metric) if f"{p}_min" in row), None)


def _federated_report(run_dir: Path, rounds: list[dict]) -> tuple[dict, Path]:
    png = plot(run_dir, run_dir / "report.png")
    last = rounds[-1]
    lines = [f"# Federated run {run_dir.resolve().name}", "", f"- rounds: {last['round']}"]
    for metric in ("accuracy", "loss"):
        if f"eval_{metric}" in last:
            prefix = _spread_prefix(last, metric)
            spread = (f" (sites {last[f'{prefix}_min']:.4f} to {last[f'{prefix}_max']:.4f}, median "
                      f"{last[f'{prefix}_median']:.4f})" if prefix else "")
            lines.append(f"- final {metric}: {last[f'eval_{metric}']:.4f}{spread}")
    if _spread_prefix(last, "accuracy") is None and _spread_prefix(last, "loss") is None:
        lines.append("- no per-site spread: this run evaluated on the server's data only (`fed simulate`)")
    sampled = sum(r.get("sampled", 0) for r in rounds)
    if any("answered" in r for r in rounds):
        dropped = sum(len(r.get("dropped", [])) for r in rounds)
        lines.append(f"- updates answered / sampled: {sum(r.get('answered', 0) for r in rounds)} / {sampled}; "
                     f"dropped as too large: {dropped}")
    else:
        lines.append(f"- client updates sampled: {sampled}")
    if "epsilon" in last:
        lines.append(f"- differential privacy: epsilon {last['epsilon']:.2f} after {last['round']} rounds")
    lines += ["", f"![accuracy and loss per round]({png.name})", ""]
    (run_dir / "report.md").write_text("\n".join(lines))
    return {"run": str(run_dir), "rounds": last["round"], **{k: v for k, v in last.items() if k != "round"}}, png


def write_report(run_dir: Path) -> tuple[dict, Path]:
    run_dir = Path(run_dir)
    kinds = _kinds(read_metrics(run_dir))
    if not kinds["train"] and kinds["round"]:
        return _federated_report(run_dir, kinds["round"])
    if not kinds["train"] and kinds.get("selfplay"):  # a self-play run (shoal/observe/selfplay_report.py)
        from shoal.observe.selfplay_report import write_selfplay_report
        return write_selfplay_report(run_dir, kinds["selfplay"], kinds.get("selfplay_eval", []), kinds["event"],
                                     event_summary(kinds["event"]))
    summary = summarize(run_dir)
    png = plot(run_dir, run_dir / "report.png")
    lines = [f"# Run {run_dir.name}", "",
             f"- steps: {summary['steps']}",
             f"- loss: {summary['first_loss']:.4f} -> {summary['final_loss']:.4f}"
             + (f" (validation {summary['final_val_loss']:.4f})" if summary["final_val_loss"] is not None else ""),
             f"- throughput: {summary['throughput']:,.0f} {summary['throughput_unit']} (median, steady state)",
             f"- time per step: {summary['step_seconds'] * 1000:.1f} ms; waiting for data "
             f"{summary['data_seconds'] * 1000:.1f} ms; compute up to the gradient exchange "
             f"{summary['compute_seconds'] * 1000:.1f} ms; then waiting for the exchange (or an outer sync) "
             f"{summary['comm_seconds'] * 1000:.1f} ms (medians on the logging rank)",
             f"- wall time: {summary['wall_seconds']:.1f} s"]
    if summary["slowest_rank"] is not None:
        lines.append(f"- slowest rank: {summary['slowest_rank']} (named a straggler: over 20% slower than the "
                     f"others' median for 3 windows in a row)")
    if summary["events"]:
        lines += ["", "## Events", ""] + [f"- {line}" for line in summary["events"]]
    lines += ["", f"![loss, data seen, throughput, time per step, per-rank timing]({png.name})", ""]
    (run_dir / "report.md").write_text("\n".join(lines))
    return summary, png
