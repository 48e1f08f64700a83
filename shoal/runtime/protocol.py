"""The launcher-worker protocol: what a launcher tells the workers it starts, and what they answer.

Three channels, each name defined here once and imported by both sides:
- environment variables a launcher sets for its workers (`*_ENV`, all `SHOAL_*`): read by
  shoal/runtime/env.py, shoal/fault/elastic.py, shoal/selfplay/ and set by shoal/launch/ and
  shoal/export/predict.py;
- the keys of the fault-tolerant job's c10d store: between the launcher's coordinator
  (shoal/fault/membership.py), the workers (shoal/fault/elastic.py), the launchers
  (shoal/launch/supervisor.py, remote.py) and the progress display (shoal/observe/fleet.py);
  values are JSON or plain numbers, never pickles;
- the exit codes a worker ends with, which the launcher reads to decide what happened. The code
  of a user's mistake (a one-line error already printed) is `shoal.config.USER_ERROR` (2), since
  the `shoal` command answers it too.

It sits in runtime/, the lowest layer that both the launchers and the workers import.
"""

from __future__ import annotations

import signal

# Environment variables a launcher sets for its workers.

LAUNCHER_PID_ENV = "SHOAL_LAUNCHER_PID"
"""The pid of the process that started the workers: a worker dies with it (runtime/env.py die_with_launcher)."""
LOCAL_WORKERS_ENV = "SHOAL_LOCAL_WORKERS"
"""Workers that Shoal's own launchers (fault-tolerant supervisor, a joining host) run on this host."""
STORE_ENV = "SHOAL_FT_STORE"
"""host:port of the fault-tolerant job's store: set, the worker is one replica of a per-step fault-tolerant job."""
MEMBER_ENV = "SHOAL_FT_MEMBER"
"""The member number the launcher gave this worker (absent: the worker takes the next one from the store)."""
SLOT_ENV = "SHOAL_FT_SLOT"
"""The launcher's slot this worker runs in (a replacement takes its predecessor's slot)."""
INCARNATION_ENV = "SHOAL_FT_INCARNATION"
"""How many workers held this slot before; 0 for the first."""
CHAOS_ENV = "SHOAL_CHAOS"
"""The `--chaos` failure plan the supervisor passes to its workers (shoal/fault/chaos.py)."""
SAMPLE_LOG_ENV = "SHOAL_SAMPLE_LOG"
"""A folder where every fault-tolerant worker records each committed step's samples (shoal/fault/audit.py)."""
SELFPLAY_ROLE_ENV = "SHOAL_SELFPLAY_ROLE"
"""'actor' or 'evaluator': the process `shoal.worker` runs instead of a learner rank."""
SELFPLAY_SLOT_ENV = "SHOAL_SELFPLAY_SLOT"
"""The actor's or evaluator's slot in the launcher's pool."""
SELFPLAY_INCARNATION_ENV = "SHOAL_SELFPLAY_INCARNATION"
"""Processes that held this slot before: a replacement's batch ids never repeat its predecessor's."""

# Signals and exit codes.

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
"""Signals after which a worker stops at the next step boundary with a checkpoint (shoal/runtime/preempt.py)."""
ELASTIC_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
"""Signals torch's elastic agent catches and forwards to the workers (TORCHELASTIC_SIGNALS_TO_HANDLE)."""


def preempted_exit_code(signum: int) -> int:
    """The exit code of a worker or run that stopped with a checkpoint after signal `signum`:
    128 + its number, what a process ended by that signal returns."""
    return 128 + signum


PREEMPTED_CODES = tuple(preempted_exit_code(s) for s in STOP_SIGNALS)
"""Exit codes of a worker or run that stopped with a checkpoint because of one of STOP_SIGNALS."""
STORE_LOST_EXIT = 3
"""Exit code of a worker that stopped with a checkpoint because the launcher's store is gone."""

# Keys of the fault-tolerant job's c10d store.

NEXT_MEMBER = "ft/next_member"
"""A counter: each new replica (worker or replica group) takes the next member number, on any host."""
PROGRESS = "ft/progress"
"""JSON {step, loss, gen, size} of the last committed step, for the launcher's progress display."""
FINISHED = "ft/finished"
"""Set once training finished: workers of other hosts still waiting to join stop."""


def ready(member: int) -> str:
    """JSON request of a member to join the next generation: {seq, after, step, has_state, leaving}."""
    return f"ft/ready/{member}"


def assignment(member: int, seq: int) -> str:
    """The generation number the coordinator placed request `seq` of `member` in."""
    return f"ft/assign/{member}/{seq}"


def committed(member: int) -> str:
    """Set after the member's first committed step: a later crash of it is no crash loop
    (shoal/launch/restarts.py)."""
    return f"ft/committed/{member}"


def generation(gen: int) -> str:
    """JSON record of a generation: {members, source, sync, step, holders, restore} or {stop, preempt}."""
    return f"ft/gen/{gen}"


def abort(gen: int) -> str:
    """Set when a member of `gen` exited or left: the others abandon the step in flight."""
    return f"ft/gen/{gen}/abort"


def reconfigure(gen: int) -> str:
    """Set when joiners wait (or the job stops): every member regroups after its next committed step."""
    return f"ft/gen/{gen}/reconfigure"


def where(gen: int, rank: int, lane: int | None = None) -> str:
    """What rank `rank` of `gen` is doing ('step 7: in allreduce'), to name a hung worker's place."""
    key = f"ft/gen/{gen}/where/{rank}"
    return key if lane is None else f"{key}/lane{lane}"


def process_group_prefix(gen: int, lane: int | None = None) -> str:
    """The PrefixStore of generation `gen`'s Gloo group (one per lane for replica groups)."""
    return f"shoal/ft/pg/{gen}" if lane is None else f"shoal/ft/pg/{gen}/lane{lane}"


def replica_group_prefix(member: int) -> str:
    """The PrefixStore of replica group `member`'s own process group (its dp_shard workers)."""
    return f"shoal/ft/group/{member}"


def chaos_claimed(injection: int) -> str:
    return f"ft/chaos/claimed/{injection}"


def chaos_fired(injection: int) -> str:
    return f"ft/chaos/fired/{injection}"


def chaos_hold(slot: int) -> str:
    """A chaos kill's `rejoin=`: the step the replacement of worker slot `slot` waits for."""
    return f"ft/chaos/hold/{slot}"


def timing(window: int, member: str) -> str:
    """JSON [data, compute, arrival] medians of a member's steps in timing window `window`
    (shoal/observe/ranks.py): the logging member reads the previous window's of every member."""
    return f"ft/timing/{window}/{member}"
