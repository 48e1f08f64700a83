"""`shoal report` of a self-play run: its strength over training, not only its loss.

A self-play run's metrics.jsonl holds one `selfplay` record per weight version (the learner's:
games and positions ingested, their rate, the losses) and one `selfplay_eval` record per
evaluated version (the evaluator's: win, draw and loss rates against plain MCTS of each
simulation count, both colours, and agreement with a perfect solver on a fixed position set).
The report draws the loss and throughput per version, the win rates and solver agreement over
weight version and over training time, and lists the events (actors that died and were
replaced, checkpoints, a resume).
"""

from __future__ import annotations

import re
from pathlib import Path

OPPONENT = re.compile(r"^win_rate_(.+)$")


def opponents(evals: list[dict]) -> list[str]:
    """The opponents evaluated against ('mcts200', 'minimax', ...), in the order first seen."""
    seen: list[str] = []
    for record in evals:
        for key in record:
            match = OPPONENT.match(key)
            if match and match.group(1) not in seen and not match.group(1).endswith(("_first", "_second")):
                seen.append(match.group(1))
    return seen


def training_minutes(selfplay: list[dict]) -> dict[int, float]:
    """Minutes of training when each weight version was published (from the first version's start)."""
    if not selfplay:
        return {}
    first = selfplay[0]
    start = first["time"] - first.get("wait_seconds", 0.0) - first.get("train_seconds", 0.0)
    return {r["version"]: (r["time"] - start) / 60 for r in selfplay}


def plot_selfplay(selfplay: list[dict], evals: list[dict], events: list[dict], out: Path, name: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 8))
    ax_loss, ax_rate, ax_time, ax_win, ax_win_t, ax_solver = axes.flat
    versions = [r["version"] for r in selfplay]
    for key in sorted({k for r in selfplay for k in r if k.endswith("loss")}):
        ax_loss.plot(versions, [r.get(key) for r in selfplay], label=key.replace("_", " "))
    ax_loss.set(xlabel="weight version", ylabel="loss", title="Learner loss per weight version")
    ax_loss.legend(fontsize="small")

    ax_rate.plot(versions, [r["positions_per_second"] for r in selfplay], color="tab:green", label="positions/s")
    ax_rate.set(xlabel="weight version", ylabel="positions/s", title="Self-play throughput (all actors)")
    ax_games = ax_rate.twinx()
    ax_games.plot(versions, [r["games_per_second"] for r in selfplay], color="tab:olive", linestyle="--",
                  label="games/s")
    ax_games.set_ylabel("games/s")
    for marker in (e for e in events if e.get("event") in ("died", "resumed")):
        ax_rate.axvline(marker.get("step", 0), color="tab:red" if marker["event"] == "died" else "black",
                        linewidth=0.8, alpha=0.6)
    ax_rate.legend(loc="upper left", fontsize="small")
    ax_games.legend(loc="upper right", fontsize="small")

    ax_time.bar(versions, [r.get("wait_seconds", 0.0) for r in selfplay], color="tab:gray", label="waiting for games")
    ax_time.bar(versions, [r.get("train_seconds", 0.0) for r in selfplay],
                bottom=[r.get("wait_seconds", 0.0) for r in selfplay], color="tab:blue", label="ingest + train")
    ax_time.set(xlabel="weight version", ylabel="seconds", title="Where each version's time went")
    ax_time.legend(fontsize="small")

    minutes = training_minutes(selfplay)
    evals = sorted(evals, key=lambda r: r["version"])
    ev_versions = [r["version"] for r in evals]
    ev_minutes = [minutes.get(v, 0.0) for v in ev_versions]
    for opponent in opponents(evals):
        rates = [r.get(f"win_rate_{opponent}") for r in evals]
        ax_win.plot(ev_versions, rates, "o-", label=f"vs {opponent}")
        ax_win_t.plot(ev_minutes, rates, "o-", label=f"vs {opponent}")
    for ax, xlabel in ((ax_win, "weight version"), (ax_win_t, "training minutes")):
        ax.set(xlabel=xlabel, ylabel="win rate (both colours)", ylim=(-0.02, 1.02))
        ax.legend(fontsize="small", loc="lower right")
    ax_win.set_title("Win rate against search, by weight version")
    ax_win_t.set_title("Win rate against search, over training time")

    agreeing = [r for r in evals if "solver_agreement" in r]
    if agreeing:
        ax_solver.plot([r["version"] for r in agreeing], [r["solver_agreement"] for r in agreeing], "o-",
                       color="black", label="by weight version (bottom axis)")
        top = ax_solver.twiny()
        top.plot([minutes.get(r["version"], 0.0) for r in agreeing], [r["solver_agreement"] for r in agreeing],
                 ":", color="tab:purple", label="over training minutes (top axis)")
        top.set_xlabel("training minutes")
        top.legend(fontsize="small", loc="upper left")
        ax_solver.legend(fontsize="small", loc="lower right")
        ax_solver.set(ylim=(-0.02, 1.02))
    ax_solver.set(xlabel="weight version", ylabel="share of positions", title="Agreement with a perfect solver")
    fig.suptitle(name)
    fig.tight_layout()
    fig.savefig(out, dpi=72)
    plt.close(fig)
    return out


def write_selfplay_report(run_dir: Path, selfplay: list[dict], evals: list[dict], events: list[dict],
                          event_lines: list[str]) -> tuple[dict, Path]:
    """report.png and report.md of a self-play run; the summary."""
    png = plot_selfplay(selfplay, evals, events, run_dir / "report.png", run_dir.resolve().name)
    last = selfplay[-1]
    minutes = training_minutes(selfplay)
    summary = {"run": str(run_dir), "versions": last["version"], "games": sum(r["games"] for r in selfplay),
               "positions": sum(r["positions"] for r in selfplay), "training_minutes": minutes[last["version"]],
               "final_loss": last.get("loss"), "evaluations": len(evals), "events": event_lines}
    lines = [f"# Self-play run {run_dir.resolve().name}", "",
             f"- weight versions: {last['version']} in {summary['training_minutes']:.1f} minutes",
             f"- games ingested: {summary['games']:,} ({summary['positions']:,} positions)"]
    if last.get("loss") is not None:
        lines.append(f"- loss: {selfplay[0]['loss']:.4f} -> {last['loss']:.4f}")
    if evals:
        final = max(evals, key=lambda r: r["version"])
        for opponent in opponents(evals):
            if f"win_rate_{opponent}" in final:
                summary[f"win_rate_{opponent}"] = final[f"win_rate_{opponent}"]
                lines.append(f"- version {final['version']} against {opponent}: win {final[f'win_rate_{opponent}']:.0%}, "
                             f"draw {final.get(f'draw_rate_{opponent}', 0):.0%}, "
                             f"loss {final.get(f'loss_rate_{opponent}', 0):.0%}")
        if "solver_agreement" in final:
            summary["solver_agreement"] = final["solver_agreement"]
            lines.append(f"- agreement with the solver: {final['solver_agreement']:.0%} of positions")
    if event_lines:
        lines += ["", "## Events", ""] + [f"- {line}" for line in event_lines]
    lines += ["", f"![loss, throughput, win rates and solver agreement]({png.name})", ""]
    (run_dir / "report.md").write_text("\n".join(lines))
    return summary, png
