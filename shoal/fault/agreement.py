"""What the replicas of a step agreed on: the typed outcome a gradient agreement's `reduce` returns
and the Trainer acts on.

The layout's own DDP/FSDP always commits; per-step fault tolerance (shoal/fault/elastic.py) may
abandon a step (a peer died in its all-reduce: nothing may be applied, and the next group retries
the same global batch) or commit it and regroup before the next one (a joiner waits, a replica leaves).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch


class Outcome(enum.Enum):
    COMMITTED = "committed"
    """Every replica averaged the step's gradients: apply them."""
    REGROUPED = "regrouped"
    """Committed as above; the replicas form a new group before the next step."""
    ABANDONED = "abandoned"
    """The average failed: apply nothing, and train the same global batch again."""
    SKIPPED = "skipped"
    """There was no step of this replica's own to train (it completed a sync it joined in the middle of)."""


@dataclass(frozen=True)
class StepOutcome:
    """One step's outcome: what happened, and the loss to report when it was applied."""

    outcome: Outcome
    loss: torch.Tensor | None = None
    loss_is_mean: bool = False
    """The loss is already the mean over every replica (no further all-reduce to report it)."""

    @property
    def applied(self) -> bool:
        """The step's gradients were applied (committed, or committed before a regroup)."""
        return self.outcome in (Outcome.COMMITTED, Outcome.REGROUPED)

    @classmethod
    def committed(cls, loss: torch.Tensor, *, loss_is_mean: bool = False, regroup: bool = False) -> StepOutcome:
        return cls(Outcome.REGROUPED if regroup else Outcome.COMMITTED, loss, loss_is_mean)

    @classmethod
    def abandoned(cls) -> StepOutcome:
        return cls(Outcome.ABANDONED)

    @classmethod
    def skipped(cls) -> StepOutcome:
        return cls(Outcome.SKIPPED)
