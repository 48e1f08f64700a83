"""Self-play as a user runs it: `shoal run examples/selfplay/tictactoe.toml` with its learner, two
actor processes and the evaluator, real processes and real signals. An actor SIGKILLed mid-run is
replaced and the learner SIGKILLed mid-run restarts from its checkpoint; afterwards no batch of
games is counted twice or half, and a learner fed the ledger's batches from scratch ends with the
killed-and-resumed learner's weights, bit for bit."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from shoal import config as config_module
from shoal.selfplay import transport
from shoal.selfplay.learner import replay_ledger
from shoal.selfplay.setup import record_type
from tests.conftest import ROOT, SHOAL, metric_records, shoal, wait_for

pytestmark = pytest.mark.slow

EXAMPLE = str(ROOT / "examples" / "selfplay" / "tictactoe.toml")
# Small searches and evaluations: seconds per version on 2 busy cores.
SMALL = ["selfplay.simulations=8", "selfplay.games_per_batch=4", "selfplay.games_per_version=8",
         "selfplay.train_steps_per_version=4", "selfplay.batch_size=32", "selfplay.eval_games=4",
         "selfplay.eval_simulations=8", "selfplay.eval_mcts_simulations=20"]


def ingested_exactly_once(run: Path, games_per_batch: int) -> list[list[str]]:
    """The ledger, after checking that each batch in it appears once and holds whole games."""
    ledger = transport.read_ledger(run)
    batches = [b for version in ledger for b in version]
    assert len(batches) == len(set(batches)), "a batch was ingested twice"
    for batch in batches:
        records = transport.read_games(run, batch, record_type())
        assert len(records) == games_per_batch, f"{batch} holds {len(records)} games"
    return ledger


def test_tictactoe_learner_two_actors_and_report(tmp_path):
    result = shoal("run", EXAMPLE, *SMALL, "selfplay.versions=6", "selfplay.eval_every=3",
                   f"log.dir={tmp_path}", cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "tictactoe"
    versions = [r["version"] for r in metric_records(run, "selfplay")]
    assert versions == [1, 2, 3, 4, 5, 6]
    assert transport.latest_version(run) == 6
    written = {p.name.split("-")[0] for p in (run / "selfplay" / "games").glob("actor*.safetensors")}
    assert written == {"actor0", "actor1"}, "both actors played games"
    ledger = ingested_exactly_once(run, games_per_batch=4)
    assert len(ledger) == 6 and all(sum(transport.batch_games(run, b) for b in v) >= 8 for v in ledger)
    evaluated = {r["version"]: r for r in metric_records(run, "selfplay_eval")}
    # every third version while it keeps up (one it falls behind on is skipped, and said so), and the last
    assert 6 in evaluated and set(evaluated) <= {0, 3, 6}, evaluated.keys()
    assert all(0 <= evaluated[6][k] <= 1 for k in ("win_rate_mcts20", "solver_agreement"))
    report = shoal("report", str(run), cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    assert (run / "report.png").stat().st_size > 10_000
    assert "against mcts20: win" in (run / "report.md").read_text()


def _pid(log: Path, pattern: str) -> int | None:
    found = re.findall(pattern, log.read_text()) if log.is_file() else []
    return int(found[-1]) if found else None


def test_actor_and_learner_killed_nothing_counted_twice_and_resume_exact(tmp_path):
    run = tmp_path / "tictactoe"
    games = run / "selfplay" / "games"
    out = tmp_path / "output.txt"
    with out.open("w") as sink:
        proc = subprocess.Popen([SHOAL, "run", EXAMPLE, *SMALL, "selfplay.versions=10", "selfplay.eval_every=0",
                                 "selfplay.lr_final=0.1", "checkpoint.every=2", f"log.dir={tmp_path}"],
                                cwd=tmp_path, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: (games / "actor0-i000-000000.safetensors").exists(), 120, "actor 0's first batch")
        actor = _pid(run / "logs" / "actors" / "actor0.log", r"incarnation 0, pid (\d+)")
        os.kill(actor, signal.SIGKILL)
        wait_for(lambda: any(games.glob("actor0-i001-*.safetensors")), 120, "the replacement actor's first batch")
        wait_for(lambda: (run / "checkpoints" / "step_00000004" / "meta.json").exists(), 120, "checkpoint 4")
        learner = _pid(run / "logs" / "learner0.log", r"pid (\d+), \d+ torch threads, attempt 0")
        os.kill(learner, signal.SIGKILL)
        proc.wait(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, out.read_text()[-3000:]
    assert "attempt 1" in (run / "logs" / "learner0.log").read_text(), "the learner was restarted"
    events = metric_records(run, "event")
    died = [e for e in events if e["event"] == "died"]
    assert [(e["role"], e["slot"], e["signal"]) for e in died] == [("actor", 0, "SIGKILL")]
    assert any(e["event"] == "replaced" and e["role"] == "actor" for e in events)
    resumed = [e for e in events if e["event"] == "resumed"]
    assert len(resumed) == 1 and 4 <= resumed[0]["step"] < 10

    ledger = ingested_exactly_once(run, games_per_batch=4)
    assert len(ledger) == 10
    records = metric_records(run, "selfplay")
    assert [r["version"] for r in records] == list(range(1, 11)), "each version logged once"
    assert [r["batches"] for r in records] == [len(v) for v in ledger]

    # The learning rate decayed over the last half (the resumed learner went on with the schedule).
    lrs = transport.read_ledger(run, "lr")
    assert lrs[:5] == [cfg_lr := lrs[0]] * 5 and lrs[-1] < lrs[-2] < lrs[5] < cfg_lr, lrs
    assert lrs[-1] == pytest.approx(0.1 * cfg_lr)
    assert [r["lr"] for r in records] == lrs

    # A fresh learner fed the same batches at the same rates, version by version, ends with the same weights.
    cfg = config_module.load(run / "config.toml")
    replayed = replay_ledger(cfg, run, threads=records[-1]["torch_threads"]).net.state_dict()
    final = transport.load_weights(run, 10)
    assert final.keys() == replayed.keys()
    for name, tensor in final.items():
        assert torch.equal(tensor, replayed[name]), name
