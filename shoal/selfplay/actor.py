"""A self-play actor: plays batches of games against itself with the newest published weights.

Each batch is `selfplay.games_per_batch` games played at once, so the search's leaf positions
of every game go to the network as one batch (shoal/selfplay/play.py, mcts.py); the finished
batch is written as one file (shoal/selfplay/transport.py), whole or not at all, tagged with the
weight version that played it. The actor checks for a newer version before every batch and
stops when the learner has finished.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path

import torch

from shoal.config import Config
from shoal.runtime.env import thread_budget
from shoal.selfplay import transport
from shoal.selfplay.play import play_games
from shoal.selfplay.setup import (actor_rng, build_network, load_game, make_evaluate, record_length,
                                  selfplay_settings)

log = logging.getLogger("shoal")
POLL = 0.05  # seconds between looks for the first weights


def _leave(signum, frame) -> None:
    # A batch in progress is simply lost (its file was never renamed into place): leave now.
    os._exit(128 + signum)


def die_with_parent() -> None:
    """End this process when the one that started it ends, even by SIGKILL: actors are forked from the
    launcher's forkserver, which exits with the launcher, so a killed launcher leaves no actor behind."""
    if sys.platform.startswith("linux"):
        import ctypes
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def load_newest(run_dir: Path, net: torch.nn.Module, current: int) -> int:
    """Load the newest published weights into `net` when newer than `current`; the version held now."""
    while True:
        latest = transport.latest_version(run_dir)
        if latest <= current:
            return current
        weights = transport.load_weights(run_dir, latest)
        if weights is not None:  # else it was replaced by a newer one while we looked: look again
            net.load_state_dict(weights)
            return latest


def wait_for_weights(run_dir: Path) -> bool:
    """Wait for the learner's first weights; False when the run ended first."""
    while transport.latest_version(run_dir) < 0:
        if transport.finished(run_dir) or transport.failure(run_dir):
            return False
        time.sleep(POLL)
    return True


def run_actor(cfg: Config, run_dir: Path, slot: int, incarnation: int) -> int:
    die_with_parent()
    torch.set_num_threads(thread_budget(cfg.launch.threads))  # the launcher counts learner, actors, evaluator
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(signum, _leave)
    sp = cfg.selfplay
    game = load_game(sp.game)
    net = build_network(game, cfg)
    net.eval()
    evaluate = make_evaluate(net)
    settings = selfplay_settings(cfg)
    rng = actor_rng(cfg.train.seed, slot, incarnation)
    print(f"actor {slot}: incarnation {incarnation}, pid {os.getpid()}, {torch.get_num_threads()} torch threads",
          file=sys.stderr, flush=True)
    if not wait_for_weights(run_dir):
        return 0
    version, counter = -1, 0
    while not transport.finished(run_dir):
        version = load_newest(run_dir, net, version)
        started = time.monotonic()
        records = play_games(game, evaluate, sp.games_per_batch, settings, rng, version)
        batch = transport.batch_id("actor", slot, incarnation, counter)
        transport.write_games(run_dir, batch, records)
        counter += 1
        seconds = time.monotonic() - started
        positions = sum(record_length(r) for r in records)
        print(f"actor {slot}: batch {batch}: {len(records)} games, {positions} positions with weights "
              f"v{version} in {seconds:.1f}s ({positions / seconds:.1f} positions/s)", file=sys.stderr, flush=True)
    return 0


