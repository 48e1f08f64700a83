"""Self-play: actor throughput, and a Connect Four player trained on this machine measured against
search and a perfect solver.

Two parts, each runnable alone (`--part throughput`, `--part train`):

- throughput: positions per second of one actor's self-play with batched leaf evaluation (the
  searches of `--games` games share one network batch per simulation step; by default the
  config's `selfplay.games_per_batch`, what its actors play) against the same
  actor playing one game at a time; then 1 against 2 actor processes (one torch thread each,
  the learner idle), each playing batched games for `--seconds`. Goals: batched >= 3x
  unbatched, 2 processes >= 1.7x one.
- train: `shoal run examples/selfplay/connect4.toml` for `--minutes` of training (selfplay.minutes),
  then its evaluations: win rate against plain MCTS with 200 and 1,000 random-rollout
  simulations (both colours) and agreement with the solver, per evaluated weight version and
  training minute; then the final weights' evaluation with `--final-games` games per opponent
  (the goals ask for >= 100). Goals: >= 90% against MCTS-200 and >= 70% against MCTS-1000 within
  60 minutes. `--part final --run DIR` is that final evaluation alone, of a finished run.

- failures: the same self-play run twice for `--fail-minutes` of training each (evaluation off),
  once clean and once with an actor SIGKILLed every `--kill-every` seconds (the slots in turn);
  games/s and versions (learner steps) of both, the kills, replacements, the longest pause
  between two versions, and whether every ingested batch is whole and counted once. With
  `--strength-games N`, both final networks then play N games against MCTS-200 (both colours).

Prints a table and writes benchmarks/out/selfplay.json (merging the parts run so far).

    .venv/bin/python benchmarks/selfplay.py --part throughput [--game connect4] [--games N] [--seconds 60]
    .venv/bin/python benchmarks/selfplay.py --part train [--minutes 60] [--final-games 100] [key=value ...]
    .venv/bin/python benchmarks/selfplay.py --part final --run RUN_DIR [--final-games 100] [key=value ...]
    .venv/bin/python benchmarks/selfplay.py --part failures [--fail-minutes 1.5] [--kill-every 20] [--strength-games 0]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHOAL = [sys.executable, "-m", "shoal.cli"]  # the `shoal` command, wherever this Python is
OUT = ROOT / "benchmarks" / "out" / "selfplay.json"
sys.path.insert(0, str(ROOT))

from shoal import config as config_module  # noqa: E402


def _actor_pieces(cfg):
    import torch
    from shoal.selfplay.setup import build_network, load_game, make_evaluate, selfplay_settings
    torch.set_num_threads(1)  # an actor's share of a 2-core machine, as the launcher gives it
    game = load_game(cfg.selfplay.game)
    torch.manual_seed(cfg.train.seed)
    net = build_network(game, cfg)
    net.eval()
    return game, make_evaluate(net), selfplay_settings(cfg)


def positions_per_second(cfg, games_at_once: int, seconds: float, seed: int) -> tuple[float, int]:
    """(positions/s, positions) of one actor playing `games_at_once` games per call for about `seconds`."""
    from shoal.selfplay.play import play_games
    from shoal.selfplay.setup import actor_rng, record_length
    game, evaluate, settings = _actor_pieces(cfg)
    rng = actor_rng(seed, 0, 0)
    positions, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        records = play_games(game, evaluate, games_at_once, settings, rng, 0)
        positions += sum(record_length(r) for r in records)
    return positions / (time.perf_counter() - started), positions


def _process_rate(cfg, games_at_once: int, seconds: float, seed: int, out) -> None:
    out.put(positions_per_second(cfg, games_at_once, seconds, seed))


def processes_rate(cfg, processes: int, games_at_once: int, seconds: float) -> float:
    """Total positions/s of `processes` actor processes running at once."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_process_rate, args=(cfg, games_at_once, seconds, 100 + i, out))
             for i in range(processes)]
    for p in procs:
        p.start()
    rates = [out.get()[0] for _ in procs]
    for p in procs:
        p.join()
    return sum(rates)


def throughput(args) -> dict:
    cfg = config_module.load(ROOT / "examples" / "selfplay" / f"{args.game}.toml", args.overrides)
    games = args.games or cfg.selfplay.games_per_batch
    unbatched, n1 = positions_per_second(cfg, 1, args.seconds, 1)
    batched, n2 = positions_per_second(cfg, games, args.seconds, 1)
    one = processes_rate(cfg, 1, games, args.seconds)
    two = processes_rate(cfg, 2, games, args.seconds)
    result = {"game": args.game, "simulations": cfg.selfplay.simulations, "channels": cfg.selfplay.channels,
              "blocks": cfg.selfplay.blocks, "games_at_once": games, "seconds_each": args.seconds,
              "unbatched_positions_per_s": unbatched, "batched_positions_per_s": batched,
              "batched_speedup": batched / unbatched, "one_process_positions_per_s": one,
              "two_processes_positions_per_s": two, "two_process_scaling": two / one}
    rows = [("unbatched search, 1 actor", f"{unbatched:.1f}", ""),
            (f"batched search ({games} games at once), 1 actor", f"{batched:.1f}",
             f"{batched / unbatched:.2f}x (goal 3x)"),
            ("1 actor process", f"{one:.1f}", ""),
            ("2 actor processes", f"{two:.1f}", f"{two / one:.2f}x (goal 1.7x)")]
    print(f"\n{args.game}, {cfg.selfplay.simulations} simulations per move, net {cfg.selfplay.channels}x"
          f"{cfg.selfplay.blocks}, {args.seconds:.0f} s each, 1 torch thread per actor")
    print(f"{'':52} {'positions/s':>12}  ratio")
    for name, rate, ratio in rows:
        print(f"{name:52} {rate:>12}  {ratio}")
    return result


def train(args) -> dict:
    log_dir = ROOT / "benchmarks" / "out" / "selfplay_runs"
    name = f"connect4_{int(time.time())}"
    command = [*SHOAL, "run", str(ROOT / "examples" / "selfplay" / "connect4.toml"),
               f"selfplay.minutes={args.minutes}", f"log.dir={log_dir}", f"log.name={name}", "log.progress=plain",
               *args.overrides]
    print("$ " + " ".join(command), flush=True)
    started = time.monotonic()
    code = subprocess.run(command, cwd=ROOT).returncode
    wall = time.monotonic() - started
    run = log_dir / name
    from shoal.observe.metrics import read_metrics
    from shoal.observe.selfplay_report import opponents, training_minutes
    records = read_metrics(run)
    selfplay = [r for r in records if r.get("kind") == "selfplay"]
    evals = sorted((r for r in records if r.get("kind") == "selfplay_eval"), key=lambda r: r["version"])
    minutes = training_minutes(selfplay)
    names = opponents(evals)
    print(f"\nConnect Four, {args.minutes} min budget: exit {code}, {wall / 60:.1f} min wall, "
          f"{selfplay[-1]['version'] if selfplay else 0} versions, {sum(r['games'] for r in selfplay)} games")
    print(f"{'version':>8} {'minute':>7} " + " ".join(f"{'win ' + n:>14}" for n in names) + f" {'solver agree':>13}")
    for r in evals:
        print(f"{r['version']:>8} {minutes.get(r['version'], 0.0):>7.1f} "
              + " ".join(f"{r.get('win_rate_' + n, float('nan')):>14.2f}" for n in names)
              + f" {r.get('solver_agreement', float('nan')):>13.2f}")
    subprocess.run([*SHOAL, "report", str(run)], cwd=ROOT, capture_output=True)
    return {"command": "shoal " + " ".join(command[3:]), "exit_code": code, "wall_minutes": wall / 60, "run_dir": str(run),
            "versions": selfplay[-1]["version"] if selfplay else 0, "games": sum(r["games"] for r in selfplay),
            "evaluations": [{**r, "training_minutes": minutes.get(r["version"])} for r in evals],
            "final": final_evaluation(run, args.final_games) if args.final_games and code == 0 else None}


def final_evaluation(run: Path, games: int, overrides: list[str] = ()) -> dict:
    """The run's newest weights evaluated as its evaluator does (`evaluate_version`: each MCTS opponent, both
    colours, and the solver's positions), with `games` games per opponent and the run's config changed by
    `overrides` (e.g. selfplay.eval_simulations); printed as a table."""
    from shoal.selfplay.evaluate import evaluate_version
    cfg, game, net, version = newest_network(run, [*overrides, f"selfplay.eval_games={games}"])
    started = time.monotonic()
    results = evaluate_version(game, net, cfg, seed=cfg.train.seed + 1_000_000, cache_dir=run / "selfplay")
    seconds = time.monotonic() - started
    print(f"\nfinal weights (version {version}, {cfg.selfplay.eval_simulations} simulations a move), {games} games "
          f"per opponent (both colours), {seconds / 60:.1f} min:")
    print(f"{'opponent':>10} {'win':>6} {'draw':>6} {'loss':>6} {'win first':>10} {'win second':>11}")
    for n in cfg.selfplay.eval_mcts_simulations:
        name = f"mcts{n}"
        print(f"{name:>10} " + " ".join(f"{results[f'{k}_rate_{name}']:>6.2f}" for k in ("win", "draw", "loss"))
              + f" {results[f'win_rate_{name}_first']:>10.2f} {results[f'win_rate_{name}_second']:>11.2f}")
    if "solver_agreement" in results:
        print(f"solver agreement {results['solver_agreement']:.2f} (policy head alone "
              f"{results['solver_agreement_policy']:.2f})")
    return {"run_dir": str(run), "version": version, "games_per_opponent": games, "overrides": list(overrides),
            "eval_simulations": cfg.selfplay.eval_simulations, "seconds": seconds, **results}


def _actor_pid(run: Path, slot: int) -> int | None:
    """The pid of the newest process of an actor slot (each writes its pid first in the slot's log)."""
    log = run / "logs" / "actors" / f"actor{slot}.log"
    found = re.findall(r"incarnation \d+, pid (\d+)", log.read_text()) if log.is_file() else []
    return int(found[-1]) if found else None


def failure_run(args, name: str, kill_every: float) -> dict:
    """One self-play run of `--fail-minutes` (evaluation off); with `kill_every` > 0 an actor is
    SIGKILLed every `kill_every` seconds from its first batch on. Its throughput and what was killed."""
    from shoal.observe.metrics import read_metrics
    from shoal.selfplay import transport
    log_dir = ROOT / "benchmarks" / "out" / "selfplay_runs"
    config = ROOT / "examples" / "selfplay" / f"{args.game}.toml"
    command = [*SHOAL, "run", str(config), f"selfplay.minutes={args.fail_minutes}", "selfplay.eval_every=0",
               f"log.dir={log_dir}", f"log.name={name}", "log.progress=plain", "log.tensorboard=false",
               *args.overrides]
    print("$ " + " ".join(command), flush=True)
    run = log_dir / name
    actors = config_module.load(config, args.overrides).selfplay.actors
    log_dir.mkdir(parents=True, exist_ok=True)
    output = log_dir / f"{name}.out"
    with output.open("w") as sink:  # a file, not a pipe: nobody reads the launcher's output while it runs
        proc = subprocess.Popen(command, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    kills, next_slot = [], 0
    while kill_every and proc.poll() is None and transport.latest_version(run) < 1:
        time.sleep(0.2)  # the clock starts when training does (the learner's first version)
    next_kill = time.monotonic() + kill_every
    while proc.poll() is None:
        time.sleep(0.2)
        if kill_every and time.monotonic() >= next_kill and not transport.finished(run):
            pid = _actor_pid(run, next_slot)
            try:
                os.kill(pid, signal.SIGKILL)
                kills.append({"slot": next_slot, "pid": pid, "at": round(time.time(), 3)})
            except (ProcessLookupError, TypeError):
                pass  # between a death and its replacement: the next tick tries again
            else:
                next_slot, next_kill = (next_slot + 1) % actors, next_kill + kill_every
    stderr = output.read_text(errors="replace")
    records = read_metrics(run)
    selfplay = [r for r in records if r.get("kind") == "selfplay"]
    events = [r for r in records if r.get("kind") == "event"]
    ledger = transport.read_ledger(run)
    batches = [b for version in ledger for b in version]
    from shoal.selfplay.setup import record_type
    games_per_batch = config_module.load(run / "config.toml").selfplay.games_per_batch
    whole = all(len(transport.read_games(run, b, record_type())) == games_per_batch for b in batches)
    times = [r["time"] for r in selfplay]
    seconds = sum(r["wait_seconds"] + r["train_seconds"] for r in selfplay)
    steps_per_version = config_module.load(run / "config.toml").selfplay.train_steps_per_version
    return {"command": "shoal " + " ".join(command[3:]), "exit_code": proc.returncode,
            "stderr_tail": stderr[-1500:] if proc.returncode else "", "run_dir": str(run),
            "versions": len(selfplay), "learner_steps": len(selfplay) * steps_per_version,
            "games": sum(r["games"] for r in selfplay), "training_seconds": seconds,
            "games_per_second": sum(r["games"] for r in selfplay) / seconds if seconds else 0.0,
            "longest_pause_between_versions_s": max((b - a for a, b in zip(times, times[1:])), default=0.0),
            "kills": len(kills), "died_events": sum(e["event"] == "died" for e in events),
            "replaced_events": sum(e["event"] == "replaced" for e in events),
            "batches_ingested": len(batches), "batches_counted_once": len(batches) == len(set(batches)),
            "batches_whole": whole, "final_loss": selfplay[-1]["loss"] if selfplay else None}


def newest_network(run: Path, overrides: list[str] = ()):
    """(config, game, network in eval mode, version) of a run's newest published weights, on 2 torch threads."""
    import torch
    from shoal.selfplay import transport
    from shoal.selfplay.setup import build_network, load_game
    cfg = config_module.load(run / "config.toml", list(overrides))
    game = load_game(cfg.selfplay.game)
    net = build_network(game, cfg)
    version = transport.latest_version(run)
    net.load_state_dict(transport.load_weights(run, version))
    torch.set_num_threads(2)
    return cfg, game, net.eval(), version


def final_strength(run: Path, games: int) -> float:
    """The win rate (draws half) of a run's newest weights against MCTS-200, both colours."""
    import numpy as np
    from shoal.selfplay.evaluate import match, mcts_player, network_player
    from shoal.selfplay.setup import make_evaluate
    cfg, game, net, _ = newest_network(run)
    rng = np.random.default_rng(0)
    player = network_player(game, make_evaluate(net), cfg.selfplay.eval_simulations, cfg.selfplay.c_puct)
    result = match(game, player, mcts_player(game, 200, rng), games, rng)
    return (result.wins + 0.5 * result.draws) / result.games


def failures(args) -> dict:
    clean = failure_run(args, f"{args.game}_clean_{int(time.time())}", 0)
    killed = failure_run(args, f"{args.game}_killed_{int(time.time())}", args.kill_every)
    if args.strength_games:
        for result in (clean, killed):
            result["win_rate_mcts200"] = final_strength(Path(result["run_dir"]), args.strength_games)
    print(f"\n{args.game}, {args.fail_minutes} min of training each, an actor SIGKILLed every {args.kill_every:.0f} s "
          f"in the second run")
    rows = [("exit code", "exit_code", "{}"), ("versions (weight versions)", "versions", "{}"),
            ("learner steps", "learner_steps", "{}"), ("games ingested", "games", "{}"),
            ("games/s", "games_per_second", "{:.2f}"), ("actors SIGKILLed", "kills", "{}"),
            ("'died' / 'replaced' events", None, ""),
            ("longest pause between versions (s)", "longest_pause_between_versions_s", "{:.1f}"),
            ("every batch whole, counted once", None, ""), ("final loss", "final_loss", "{:.3f}")]
    if args.strength_games:
        rows.append((f"win rate vs MCTS-200 ({args.strength_games} games)", "win_rate_mcts200", "{:.2f}"))
    print(f"{'':40} {'clean':>12} {'actor kills':>12}")
    for label, key, form in rows:
        if label.startswith("'died'"):
            cells = [f"{r['died_events']} / {r['replaced_events']}" for r in (clean, killed)]
        elif key is None:
            cells = [str(r["batches_counted_once"] and r["batches_whole"]) for r in (clean, killed)]
        else:
            cells = [form.format(r[key]) if r.get(key) is not None else "-" for r in (clean, killed)]
        print(f"{label:40} {cells[0]:>12} {cells[1]:>12}")
    for label, result in (("clean", clean), ("with kills", killed)):
        if result["exit_code"]:
            print(f"\n{label} run failed:\n{result['stderr_tail']}")
    return {"game": args.game, "minutes_each": args.fail_minutes, "kill_every_s": args.kill_every,
            "clean": clean, "with_kills": killed}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("throughput", "train", "final", "failures", "all"), default="all")
    parser.add_argument("--game", default="connect4", help="throughput: the example config's game")
    parser.add_argument("--games", type=int, default=None,
                        help="throughput: games one actor plays at once (default: the config's "
                             "selfplay.games_per_batch)")
    parser.add_argument("--seconds", type=float, default=60.0, help="throughput: seconds per measurement")
    parser.add_argument("--minutes", type=float, default=60.0, help="train: the training budget (selfplay.minutes)")
    parser.add_argument("--final-games", type=int, default=100,
                        help="train, final: games per opponent of the final weights' evaluation (0: none)")
    parser.add_argument("--run", type=Path, help="final: the run directory whose newest weights to evaluate")
    parser.add_argument("--fail-minutes", type=float, default=1.5, help="failures: training minutes of each run")
    parser.add_argument("--kill-every", type=float, default=20.0, help="failures: seconds between actor kills")
    parser.add_argument("--strength-games", type=int, default=0,
                        help="failures: games of each final network against MCTS-200 (0: none)")
    parser.add_argument("overrides", nargs="*",
                        help="key=value for the example config (final: for the run's config, e.g. "
                             "selfplay.eval_simulations=200)")
    args = parser.parse_args()
    results = json.loads(OUT.read_text()) if OUT.is_file() else {}
    if args.part in ("throughput", "all"):
        results["throughput"] = throughput(args)
    if args.part in ("train", "all"):
        results["train"] = train(args)
    if args.part == "final":
        if args.run is None or not (args.run / "config.toml").is_file():
            parser.error(f"--part final needs --run DIR, a self-play run directory (got {args.run})")
        key = " ".join(["final", *args.overrides])  # one entry per evaluation setting
        results[key] = final_evaluation(args.run, args.final_games, args.overrides)
    if args.part == "failures":  # not in "all": it runs its own two trainings
        results["failures"] = failures(args)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
