"""The Trainer under a gradient agreement that abandons, skips and regroups steps, in one process.

A fault-tolerant job's agreement (shoal/fault/elastic.py) does these when peers die or join; here a
scripted one does them at chosen attempts, so the Trainer's side of the contract is tested without
killing processes: an abandoned step applies nothing and is retried on the same global batch, a
skipped attempt trains nothing, and after a regroup the replica trains its share of each batch.
"""

from __future__ import annotations

import torch

from shoal import config
from shoal.fault.agreement import Outcome, StepOutcome
from tests.conftest import one_process_trainer

STEPS, BATCH = 6, 16
ARGS = ["model.name=mlp", "data.source=synthetic", "data.num_samples=512", f"train.batch_size={BATCH}",
        "train.warmup_steps=2", "train.eval_every=0", f"train.steps={STEPS}", "log.progress=off",
        "log.tensorboard=false"]


class ScriptedAgreement:
    """Agrees on every step except where `script` says otherwise, by attempt number (from 1):
    "abandon" (a peer died during the reduce), "skip" (no step to train now), "regroup" (committed,
    and the group regroups before the next step), or a (dp_rank, dp_size) this replica holds from
    that attempt on (the group regrouped)."""

    agrees_on_stop, shows_progress, weights_by_samples = False, True, False  # as the layout's own DDP

    def __init__(self, script: dict):
        self.script, self.attempts, self.placement = script, 0, (0, 1)
        self.reduced: list[tuple[int, int, float]] = []  # (step, samples, loss) of every reduce
        self.trainer = None  # set once the Trainer exists: the step a reduce belongs to
        self.outcomes: list[Outcome] = []

    def begin_step(self):
        self.attempts += 1
        self.action = self.script.get(self.attempts)
        if self.action == "skip":
            return None
        if isinstance(self.action, tuple):
            self.placement = self.action
        return self.placement

    def reduce(self, samples: int, loss: torch.Tensor) -> StepOutcome:
        self.reduced.append((self.trainer.step, samples, float(loss)))
        outcome = (StepOutcome.abandoned() if self.action == "abandon" else
                   # the loss as the group's mean: no all-reduce in this process
                   StepOutcome.committed(loss, loss_is_mean=True, regroup=self.action == "regroup"))
        self.outcomes.append(outcome.outcome)
        return outcome

    def writes_metrics(self) -> bool:
        return True

    def saves_checkpoints(self) -> bool:
        return True


def train(tmp_path, name: str, script: dict):
    agreement = ScriptedAgreement(script)
    trainer = one_process_trainer(config.load(None, ARGS), tmp_path / name, sync=agreement)
    agreement.trainer = trainer
    losses = trainer.fit()
    return trainer, agreement, losses


def test_an_abandoned_step_applies_nothing_and_is_retried_on_the_same_batch(tmp_path):
    clean, _, clean_losses = train(tmp_path, "clean", {})
    trainer, agreement, losses = train(tmp_path, "abandoned", {3: "abandon"})
    assert agreement.attempts == STEPS + 1 and trainer.step == STEPS
    (step_a, samples_a, loss_a), (step_b, samples_b, loss_b) = agreement.reduced[2:4]
    assert step_a == step_b == 2 and samples_a == samples_b == BATCH
    assert loss_a == loss_b  # the retry saw the same samples with the same weights
    assert agreement.outcomes.count(Outcome.ABANDONED) == 1 and losses == clean_losses
    for (name, mine), theirs in zip(trainer.model.module.state_dict().items(),
                                    clean.model.module.state_dict().values()):
        assert torch.equal(mine, theirs), name  # nothing of the abandoned attempt was applied


def test_a_skipped_attempt_trains_nothing_and_a_regrouped_replica_trains_its_share(tmp_path):
    trainer, agreement, losses = train(tmp_path, "regrouped", {2: "skip", 4: (1, 2)})
    assert trainer.step == STEPS and agreement.attempts == STEPS + 1 and len(losses) == STEPS
    steps = [step for step, _, _ in agreement.reduced]
    assert steps == list(range(STEPS))  # the skipped attempt never reached the reduce
    samples = [count for _, count, _ in agreement.reduced]
    assert samples == [BATCH, BATCH] + [BATCH // 2] * (STEPS - 2)  # rank 1 of 2 from the third step
    assert (trainer.where.dp_rank, trainer.where.dp_size) == (1, 2)


def test_a_step_committed_before_a_regroup_is_applied(tmp_path):
    _, _, clean_losses = train(tmp_path, "clean", {})
    trainer, agreement, losses = train(tmp_path, "regroup", {3: "regroup"})
    assert agreement.outcomes[2] is Outcome.REGROUPED and agreement.attempts == STEPS
    assert losses == clean_losses and trainer.step == STEPS  # applied like any committed step
