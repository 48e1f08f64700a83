"""FedBuff on the server: no rounds, every free client trains, each full buffer is one server version.

Nguyen et al., "Federated Learning with Buffered Asynchronous Aggregation", AISTATS 2022
(arXiv:2106.06639); the aggregation rule is `strategies/fedbuff.py`. Asynchrony gives a fast site
two levers a synchronous round does not, and both are closed here:

1. Volume: a site that answers ten times faster would fill most of every buffer. No site gets
   more than its share of one buffer (`federated.buffer_per_site`, by default
   ceil(buffer_size / connected sites), not counting sites whose last STRIKES updates were
   refused, so a site sending only refused updates cannot stall the buffer): a site at its share
   gets no new task until the buffer is applied, so no work is wasted and the share is enforced
   where tasks are handed out.
2. Drift: a bound relative to the current model compounds (an update of 9x the model passes
   "ten times the current model" every version, and the model grows geometrically). Each update
   is bounded instead against a reference one site cannot move: NORM_FACTOR times the lower
   median over sites of each site's latest update norm (one vote per site, however fast), and
   before any site has sent one, NORM_FACTOR times max(1, the initial model's norm). Norms are
   staleness-weighted, 1 / sqrt(1 + staleness), as FedBuff weights the update itself.

An update over the bound is dropped and its site named (log, `dropped` in metrics.jsonl); the
server keeps serving the honest sites. Only models that passed the checks of `aggregate.py` are
ever saved.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter

import torch

from shoal.federated import federation_pb2 as pb
from shoal.federated.aggregate import NORM_FACTOR, mean_loss
from shoal.federated.mailbox import Stopped
from shoal.federated.strategies import ClientUpdate
from shoal.federated.strategies.fedbuff import staleness_weight

log = logging.getLogger("shoal.federated.server")
# refusals in a row after which a site stops counting toward the fair share: one refusal is what an honest
# site with more data than the others gets before its first vote is in (see NormReference)
STRIKES = 2


class NormReference:
    """Each site's latest (staleness-weighted) update norm, one vote per site, and the bound they set."""

    def __init__(self, max_update_norm: float, initial: torch.Tensor):
        self.fixed = max_update_norm
        self.start = NORM_FACTOR * max(1.0, float(initial.norm()))
        self.latest: dict[str, float] = {}

    def bound(self) -> float:
        """NORM_FACTOR x the lower median over sites: a fast site has one vote however often it answers, and
        sites that train on more data (larger honest updates) are not held to the fastest site's norm."""
        if self.fixed > 0:
            return self.fixed
        if not self.latest:
            return self.start
        ordered = sorted(self.latest.values())
        return NORM_FACTOR * ordered[(len(ordered) - 1) // 2]

    def admit(self, site: str, weighted_norm: float) -> bool:
        """True when the norm is within the bound set by the votes so far; the site's vote becomes this norm."""
        within = weighted_norm <= self.bound()
        self.latest[site] = weighted_norm if math.isfinite(weighted_norm) else math.inf
        return within


def fair_share(buffer_size: int, per_site: int, live: int) -> int:
    """Most updates one site may place in one buffer."""
    return per_site if per_site > 0 else max(1, math.ceil(buffer_size / max(1, live)))


class AsyncRounds:
    """Mixed into RoundDriver: needs its mailbox, aggregator, history, global model, config and record()."""

    def run_async(self) -> None:
        """FedBuff: keep every live client busy within its share; apply each full buffer as one server version."""
        fed = self.fed
        version, buffer, started = 0, [], time.monotonic()
        self.history = {0: self.global_params.clone()}
        reference = NormReference(fed.max_update_norm, self.global_params)
        busy: set[str] = set()
        in_buffer: Counter[str] = Counter()
        dropped: list[str] = []
        strikes: Counter[str] = Counter()  # refusals in a row; at STRIKES a site no longer shrinks the others' share
        deadline = time.monotonic() + fed.join_timeout
        while version < fed.rounds:
            if self.mailbox.stopping:
                raise Stopped(f"stopped at version {version}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"fedbuff: no acceptable update for {fed.join_timeout}s (federated.join_timeout); "
                                   f"stopping at version {version}; model.safetensors holds the last checked model")
            live = self.mailbox.live()
            share = fair_share(fed.buffer_size, fed.buffer_per_site, sum(strikes[c] < STRIKES for c in live))
            for cid in live:
                if cid not in busy and in_buffer[cid] < share:
                    self.mailbox.assign(cid, pb.Task(kind=pb.Task.TRAIN, round=version, model_version=version,
                                                     model=self.model_bytes(), config=self.model_config))
                    busy.add(cid)
            self.mailbox.wait_replies(time.monotonic() + 1.0)
            for reply in self.mailbox.take():
                busy.discard(reply.client_id)
                update = reply.result
                strikes[reply.client_id] += 1
                if not isinstance(update, ClientUpdate):
                    continue
                staleness = version - update.base_version
                if staleness > fed.max_staleness:
                    log.warning("fedbuff: dropped an update from %s that is %d versions stale", update.client_id,
                                staleness)
                    continue
                norm = staleness_weight(staleness) * float(update.delta.norm())
                if not reference.admit(update.client_id, norm):
                    if update.client_id not in dropped:  # once per site and version: a fast site retries at once
                        log.warning("fedbuff version %d: dropped the update of %s: staleness-weighted norm %.4g over "
                                    "the bound %.4g (%g x the median over sites, federated.max_update_norm)",
                                    version + 1, update.client_id, norm, reference.bound(), NORM_FACTOR)
                        dropped.append(update.client_id)
                    continue
                strikes[update.client_id] = 0
                deadline = time.monotonic() + fed.join_timeout
                buffer.append(update)
                in_buffer[update.client_id] += 1
                if len(buffer) >= fed.buffer_size:
                    version += 1
                    self.global_params, refused = self.aggregator.from_updates(version, self.global_params, buffer,
                                                                               len(buffer), 1.0)
                    self.history[version] = self.global_params.clone()
                    self.history.pop(version - fed.max_staleness - 1, None)
                    row = {"round": version, "answered": len(buffer),
                           "staleness": [version - 1 - u.base_version for u in buffer],
                           "sites": dict(sorted(in_buffer.items())), "share": share,
                           "train_loss": mean_loss([u.metrics.get("train_loss", float("nan")) for u in buffer]),
                           "seconds": time.monotonic() - started}
                    if dropped or refused:
                        row["dropped"] = sorted(set(dropped + refused))
                    self.record(row)
                    buffer, started, dropped = [], time.monotonic(), []
                    in_buffer.clear()
                    if version >= fed.rounds:
                        break
        self.mailbox.cancel(sorted(busy))
