"""Which self-play process this is: a learner rank, an actor or the evaluator.

`shoal.worker` hands a config with `selfplay.game` set to `run_process`. The launcher's
elastic agent starts the learner ranks; the pool beside it (shoal/launch/actors.py) starts
actors and the evaluator with their role, slot and incarnation in the environment.
"""

from __future__ import annotations

import os
from pathlib import Path

from shoal.config import Config, ConfigError
from shoal.selfplay import transport


def run_process(cfg: Config, *, run_dir: str | None, resume: str | None, verbose: bool) -> int:
    """Run this process's part of a self-play job; its exit code."""
    if not run_dir:
        raise ConfigError("selfplay.game is set: start self-play with `shoal run CONFIG` (its learner, actors and "
                          "evaluator share the run directory the launcher makes)")
    path = Path(run_dir)
    role = os.environ.get(transport.ROLE_ENV, "learner")
    if role == "actor":
        from shoal.selfplay.actor import run_actor
        return run_actor(cfg, path, int(os.environ[transport.SLOT_ENV]), int(os.environ[transport.INCARNATION_ENV]))
    if role == "evaluator":
        from shoal.selfplay.evaluator import run_evaluator
        return run_evaluator(cfg, path)
    from shoal.selfplay.learner import run_learner
    return run_learner(cfg, path, resume=resume, verbose=verbose)
