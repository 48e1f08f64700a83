"""The self-play evaluator: how strong each evaluated weight version is, measured while training goes on.

Every `selfplay.eval_every` versions (and the last one), it plays the network (its search with
`selfplay.eval_simulations` simulations, no noise, the most visited move) against plain MCTS with
random rollouts at each of `selfplay.eval_mcts_simulations` (OpenSpiel's and AlphaZero.jl's
yardstick), half the games with each colour, and checks the network's own choice on a fixed
set of solved positions against a perfect solver (shoal/selfplay/evaluate.py, solver.py). The
results are `selfplay_eval` records in metrics.jsonl, which `shoal report` draws over weight
version and over training time.

It runs beside the actors, so evaluation never stops the learner. When it falls behind (MCTS
with 1,000 rollouts per move is slow) it takes the newest due version and says which it skipped.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from shoal.config import Config
from shoal.observe.metrics import MetricsLog, read_metrics
from shoal.runtime.env import thread_budget
from shoal.selfplay import transport
from shoal.selfplay.actor import die_with_parent
from shoal.selfplay.setup import build_network, load_game

POLL = 0.2  # seconds between looks for a new version to evaluate


def evaluated_versions(run_dir: Path) -> set[int]:
    """Versions a previous evaluator of this run already measured (after a replacement or a resume)."""
    try:
        return {r["version"] for r in read_metrics(run_dir) if r.get("kind") == "selfplay_eval"}
    except (FileNotFoundError, ValueError):
        return set()


def due_version(run_dir: Path, every: int, done: set[int]) -> int | None:
    """The newest published version to evaluate now: a multiple of `every`, or the last one once the
    learner finished; None when there is none."""
    final = transport.finished(run_dir)
    versions = [v for v, _ in transport.weight_versions(run_dir)]
    due = [v for v in versions if v not in done and (v % every == 0 or (final and v == versions[-1]))]
    return due[-1] if due else None


def run_evaluator(cfg: Config, run_dir: Path) -> int:
    from shoal.selfplay.evaluate import evaluate_version
    die_with_parent()
    torch.set_num_threads(thread_budget(cfg.launch.threads))
    sp = cfg.selfplay
    game = load_game(sp.game)
    net = build_network(game, cfg)
    net.eval()
    done = evaluated_versions(run_dir)
    metrics = MetricsLog(run_dir, tensorboard=False)
    try:
        while True:
            version = due_version(run_dir, sp.eval_every, done)
            if version is None:
                if transport.finished(run_dir) or transport.failure(run_dir):
                    return 0
                time.sleep(POLL)
                continue
            weights = transport.load_weights(run_dir, version)
            if weights is None:  # withdrawn by a resumed learner, or pruned: look again
                done.add(version)
                continue
            skipped = sorted(v for v, _ in transport.weight_versions(run_dir)
                             if v < version and v % sp.eval_every == 0 and v not in done)
            if skipped:
                print(f"evaluator: behind the learner; versions {skipped} not evaluated", file=sys.stderr, flush=True)
                done.update(skipped)
            net.load_state_dict(weights)
            started = time.monotonic()
            results = evaluate_version(game, net, cfg, seed=cfg.train.seed + version, cache_dir=run_dir / "selfplay")
            metrics.log({"kind": "selfplay_eval", "step": version, "version": version,
                         "eval_seconds": round(time.monotonic() - started, 3), **results})
            print(f"evaluator: version {version}: " + ", ".join(f"{k} {v:.3f}" for k, v in results.items()),
                  file=sys.stderr, flush=True)
            done.add(version)
    finally:
        metrics.close()
