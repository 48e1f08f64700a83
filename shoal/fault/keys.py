"""The keys of the fault-tolerant job's c10d store: the protocol between the launcher's
coordinator (shoal/fault/membership.py), the workers (shoal/fault/elastic.py), the launchers
(shoal/launch/supervisor.py, remote.py) and the progress display (shoal/observe/fleet.py).

Values are JSON or plain numbers, never pickles. Every key the job uses is named here, once.
"""

from __future__ import annotations

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


def timing(window: int, member: str) -> str:
    """JSON [data, compute, arrival] medians of a member's steps in timing window `window`
    (shoal/observe/ranks.py): the logging member reads the previous window's of every member."""
    return f"ft/timing/{window}/{member}"
