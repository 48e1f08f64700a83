"""Joining the next generation of replicas, and the state transfer to a replica without current state.

A replica asks the coordinator (shoal/fault/membership.py, in the launcher) for the next generation
when it starts, when a step was abandoned, or when the generation regroups (joiners wait, a replica
leaves). A worker without current state (a replacement, a joiner, or one that missed a step the
others committed) receives parameters, optimizer state, step, RNG and data position from a live
peer by one broadcast over the new group (per lane: each rank receives its own shards from the same
rank of the source group). The approach follows torchft's per-step quorum (Rice et al., "TorchFT",
2025), with membership kept in the c10d store of the launcher instead of a separate lighthouse.
State travels as raw tensor bytes (shoal/fault/state.py): nothing is unpickled.
"""

from __future__ import annotations

import json
import logging
import signal
import time

import torch
import torch.distributed as dist

from shoal.fault.errors import GenerationBroken, JobStopped
from shoal.fault.generation import Generation
from shoal.fault.replica import Replica
from shoal.fault.state import TrainingHost, pack_state, unpack_state
from shoal.fault.store import ReplicaStore
from shoal.runtime import preempt
from shoal.runtime import protocol as keys

log = logging.getLogger("shoal")


class Joiner:
    """Takes this replica into the next generation, with the training state when it lacks it."""

    def __init__(self, store: ReplicaStore, generation: Generation, replica: Replica, *, join_timeout: float):
        self.store, self.generation, self.replica, self.join_timeout = store, generation, replica, join_timeout
        # A worker of the first launch has the state every first-launch worker has (same seed or
        # the same checkpoint); a restarted one must receive it from a peer.
        self.has_state = replica.incarnation == 0
        self.seq = 0  # numbers this replica's requests to join
        self.saved_alone = 0  # the step of the last checkpoint saved as the only holder of the state
        self.save_alone_pending = False

    def join(self, host: TrainingHost) -> None:
        """Ask the coordinator for the next generation, build its group, sync state if needed."""
        generation, replica = self.generation, self.replica
        generation.groups.abandon()
        gen, info = self._ask(host)
        self._check_admitted(info, host)
        # A lane that lost the store stops as a member of the generation it was in; so must its peers.
        previous = generation.number, generation.members
        if info is not None:
            generation.enter(gen, info["members"])
        started = time.perf_counter()
        # The only worker holding the training state: one more kill would lose it all, so it saves a
        # checkpoint (the job restarts from it if every holder dies, shoal/fault/membership.py).
        alone = (info is not None and info.get("holders") == 1 and info["source"] == replica.member
                 and host.step > self.saved_alone)
        self.save_alone_pending = False
        buffer, failure = None, None
        try:
            buffer = self._connect(info, host, alone)
        except GenerationBroken as err:
            failure = err
        # Every rank of a replica group must have connected (and received its shards) before
        # any of them goes on; otherwise the whole group asks again, copying nothing in.
        agreed = replica.agree({"joined": float(failure is None), "store_lost": float(self.store.lost is not None)},
                               f"joining generation {gen}")
        if agreed["store_lost"] > 0:
            generation.enter(*previous)
        self.store.stop_if_lost(agreed["store_lost"])
        if agreed["joined"] < replica.group_size:
            raise failure or GenerationBroken("another lane of this replica group could not join")
        self._take_state(info, buffer, host)
        # Without a joiner to hand the state to, it saves at the next step boundary, in the background.
        self.save_alone_pending = alone and not info["sync"]
        unit = "worker" if not replica.grouped else "replica group"
        log.info("generation %d: %d %ss %s, this is rank %d at step %d (%.2fs%s)", gen, generation.size, unit,
                 generation.members, generation.rank, host.step, time.perf_counter() - started,
                 f", state from {unit} {info['source']}" if info["sync"] else "")

    def save_if_left_alone(self, host: TrainingHost) -> None:
        """At a step boundary after this replica was left the only holder of the state: save it."""
        if self.save_alone_pending and host.step > self.saved_alone:
            self.save_alone_pending = False
            self._save_alone(host)

    def _ask(self, host: TrainingHost) -> tuple[int, dict | None]:
        """Ask to join after the current generation; the answer, (generation, its record), or
        (the current generation, None) when the store was lost on the way (in a replica group)."""
        generation = self.generation
        self.seq += 1
        if self.replica.lane == 0:  # a replica group asks once; its ranks share step and state, and all join
            self.store.set(keys.ready(self.replica.member), json.dumps({
                "seq": self.seq, "after": generation.number, "step": host.step, "has_state": self.has_state,
                "leaving": preempt.requested()}))
        log.info("asking to join after generation %d (step %d, %s)", generation.number, host.step,
                 "holding state" if self.has_state else "needing state")
        try:
            return self.store.await_assignment(self.seq, self.join_timeout, (generation.number, None))
        except dist.DistStoreError:
            raise RuntimeError(f"worker {self.replica.member} was not admitted within fault.join_timeout = "
                               f"{self.join_timeout}s") from None

    def _check_admitted(self, info: dict | None, host: TrainingHost) -> None:
        """Stop here when the coordinator ended the job or let this replica leave."""
        if info is not None and info.get("stop"):
            if info.get("preempt"):  # every member stops at this committed step; the master saves
                raise preempt.Preempted(info["preempt"], host.step)
            raise JobStopped(info["stop"])
        if info is not None and self.replica.member not in info["members"]:  # it asked to leave: no checkpoint
            raise preempt.Preempted(preempt.requested() or signal.SIGTERM, host.step, save=False)

    def _connect(self, info: dict | None, host: TrainingHost, alone: bool) -> torch.Tensor | None:
        """Connect the new generation's group and, when it syncs state, run the transfer: the
        state that arrived (copied in only once every lane has it), or None without a transfer."""
        if info is None:
            raise GenerationBroken(str(self.store.lost))
        self.generation.connect()
        if not info["sync"]:
            return None
        if alone:  # one kill during the transfer would lose the state: it goes to disk first
            self._save_alone(host)
        if info["source"] == self.replica.member:
            host.finish_saves()  # a background save of the state it sends lands first
        return self._transfer(host, self.generation.members.index(info["source"]))

    def _take_state(self, info: dict, buffer: torch.Tensor | None, host: TrainingHost) -> None:
        """Copy in what the transfer brought, or restore the checkpoint the coordinator named."""
        # A member holding state at the source's step already has it (replicas in lockstep) or
        # must keep its own (DiLoCo replicas between syncs): only the others copy it in.
        if buffer is not None and (not self.has_state or host.step != info["step"]):
            unpack_state(host, buffer)
            self.has_state = True
        elif info.get("restore", -1) >= 0:  # every holder of the state died: all restart from the checkpoint
            host.load_checkpoint(info["restore"])
            self.has_state = True
            log.info("restored the checkpoint of step %d", host.step)

    def _transfer(self, host: TrainingHost, source: int) -> torch.Tensor:
        """Broadcast the source's whole training state to the generation as one byte buffer
        (in a replica group: this lane's shards, from the same lane of the source group), and
        return what arrived; the caller copies it in.

        Members that already hold the source's state receive identical bytes, so even a
        broadcast cut short cannot corrupt them; nothing is copied in unless it completed."""
        generation = self.generation
        buffer = pack_state(host)
        generation.mark(host.step, "in state transfer")
        options = dist.BroadcastOptions()
        options.rootRank = source
        work = generation.pg.broadcast([buffer], options)
        generation.fire("transfer", host.step, is_source=generation.rank == source)
        generation.wait(work, "state transfer", host.step)
        return buffer

    def _save_alone(self, host: TrainingHost) -> None:
        log.info("the only worker holding the training state: saving a checkpoint at step %d", host.step)
        host.save_checkpoint(background=True)
        self.saved_alone = host.step
