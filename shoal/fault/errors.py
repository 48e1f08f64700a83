"""The ways a fault-tolerant replica's step or training cannot go on.

A broken generation costs one step (the replicas form the next one and retry it); the others end
this worker's training, each with its own exit (shoal/fault/exits.py).
"""


class GenerationBroken(Exception):
    """The current generation cannot finish this step; a new one must be formed."""


class StoreLost(RuntimeError):
    """The launcher's membership store is unreachable: the job stops with a checkpoint."""


class JobStopped(RuntimeError):
    """The coordinator ended the job (every worker with current state is gone)."""


class GroupBroken(RuntimeError):
    """A peer of this worker's own replica group is gone: the group cannot go on, and the
    supervisor restarts all of it (it kills the rest of the group in any case)."""
