"""Per-step membership for fault-tolerant data parallelism: the worker's side.

In fault-tolerant mode every worker is a whole replica of the model. Each step the
replicas average their gradients over the process group of the current *generation*, a
`ProcessGroupGloo` built on `PrefixStore("shoal/ft/pg/<g>")` over the launcher's TCPStore,
so a new generation never meets the keys of an old one. When the all-reduce fails (a
peer died), times out (a peer hangs) or the coordinator aborts the generation (the
launcher saw a peer exit), the step is abandoned before anything is applied and the
worker asks the coordinator (shoal/fault/membership.py, in the launcher) for the next
generation. A worker without current state (a replacement, a joiner, or one that missed
a step the others committed) receives parameters, optimizer state, step, RNG and data
position from a live peer by one broadcast over the new group. The approach follows
torchft's per-step quorum (Rice et al., "TorchFT", 2025), with membership kept in the
c10d store of the launcher instead of a separate lighthouse.

Nothing is unpickled: requests and generations are JSON in the store, state is raw
tensor bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from shoal.config import Config
from shoal.data.sampler import ShardedSampler
from shoal.fault import chaos

log = logging.getLogger("shoal")

STORE_ENV, MEMBER_ENV, SLOT_ENV, INCARNATION_ENV = "SHOAL_FT_STORE", "SHOAL_FT_MEMBER", "SHOAL_FT_SLOT", "SHOAL_FT_INCARNATION"
CHAOS_ENV = "SHOAL_CHAOS"
SAMPLE_LOG_ENV = "SHOAL_SAMPLE_LOG"
"""A folder: each worker appends the global sample ids of every step it commits (tests, benchmark)."""
POLL = timedelta(milliseconds=20)


class GenerationBroken(Exception):
    """The current generation cannot finish this step; a new one must be formed."""


class StoreLost(RuntimeError):
    """The launcher's membership store is unreachable: the job stops with a checkpoint."""


class JobStopped(RuntimeError):
    """The coordinator ended the job (every worker with current state is gone)."""


def materialize_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer's per-parameter state without changing anything it means.

    A joiner has no state yet, but the state broadcast needs the same tensors on every rank.
    A step with zero gradients and lr = 0 creates them and leaves parameters unchanged; the
    new state is then zeroed so the next real step behaves as the first one would (for SGD
    momentum and Adam(W) with the default dampening, a zero buffer equals an absent one)."""
    missing = {id(p) for group in optimizer.param_groups for p in group["params"] if p not in optimizer.state}
    if not missing:
        return
    saved_lr = [group["lr"] for group in optimizer.param_groups]
    saved_grads = {p: p.grad for group in optimizer.param_groups for p in group["params"]}
    for group in optimizer.param_groups:
        group["lr"] = 0.0
        for p in group["params"]:
            p.grad = torch.zeros_like(p) if id(p) in missing else None
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, saved_lr):
        group["lr"] = lr
    for p, grad in saved_grads.items():
        p.grad = grad
    for p in (p for group in optimizer.param_groups for p in group["params"] if id(p) in missing):
        for value in optimizer.state[p].values():
            if torch.is_tensor(value):  # fresh moments and counters (weight decay may have touched them)
                value.zero_()


def state_tensors(model, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Everything a replica's training depends on, in an order every replica agrees on."""
    params = list(model.parameters())
    tensors = [p.data for p in params]
    for p in params:
        state = optimizer.state.get(p, {})
        tensors += [state[k] for k in sorted(state) if torch.is_tensor(state[k])]
    return tensors


def _state_parts(trainer) -> list[torch.Tensor]:
    sampler = trainer.sampler.state_dict()
    meta = torch.tensor([trainer.step, sampler["epoch"], sampler["position"]], dtype=torch.int64)
    return state_tensors(trainer.model, trainer.optimizer) + [meta, torch.get_rng_state()]


def pack_state(trainer) -> torch.Tensor:
    """A trainer's whole state (parameters, optimizer state, step, data position, RNG) as one
    byte buffer; the layout is the same on every replica of the same model and optimizer."""
    materialize_optimizer_state(trainer.optimizer)
    return torch.cat([t.detach().reshape(-1).contiguous().view(torch.uint8) for t in _state_parts(trainer)])


def unpack_state(trainer, buffer: torch.Tensor) -> None:
    """Load a buffer made by `pack_state` on another replica into this trainer."""
    materialize_optimizer_state(trainer.optimizer)
    parts = _state_parts(trainer)
    offset = 0
    for t in parts[:-1]:  # tensors, then meta; the RNG state is set rather than copied into
        n = t.numel() * t.element_size()
        t.copy_(buffer[offset:offset + n].clone().view(t.dtype).view_as(t))  # clone: aligned for any dtype
        offset += n
    step, epoch, position = (int(v) for v in parts[-2])
    trainer.step = step
    trainer.sampler.load_state_dict({"epoch": epoch, "position": position})
    torch.set_rng_state(buffer[offset:].clone())


def _claim(store: dist.Store, injection: int, gen: int) -> bool:
    """Record that chaos injection k fires now, in generation `gen`; false if it already fired."""
    if store.add(f"ft/chaos/claimed/{injection}", 1) != 1:
        return False
    store.set(f"ft/chaos/fired/{injection}", str(gen))
    return True


def _fired_in(store: dist.Store, injection: int) -> int:
    key = f"ft/chaos/fired/{injection}"
    return int(store.get(key)) if store.check([key]) else -1


class Replicas:
    """This worker's membership in the changing group of replicas; the Trainer asks it for the
    step's data-parallel rank and size (`begin_step`) and for the gradient average (`reduce`)."""

    def __init__(self, store: dist.Store, *, member: int, slot: int, incarnation: int, cfg: Config,
                 chaos_points: chaos.ChaosPoints | None = None, sample_log: Path | None = None):
        self.store, self.member, self.slot, self.cfg = store, member, slot, cfg
        self.timeout = timedelta(seconds=cfg.fault.step_timeout)
        self.chaos = chaos_points
        self.sample_log = sample_log / f"member{member}.jsonl" if sample_log else None
        self.gen, self.members, self.rank = -1, [member], 0
        self.pg: dist.ProcessGroup | None = None
        # A worker of the first launch has the state every first-launch worker has (same seed or
        # the same checkpoint); a restarted one must receive it from a peer.
        self.has_state = incarnation == 0
        self.needs_join = True
        self.seq = 0
        self.abandoned: list[dist.ProcessGroup] = []  # kept alive: a group's destructor would wait on its stuck work
        self.step_start: dict | None = None
        self.step_started = -1

    def rollback(self, trainer) -> None:
        """Undo the data position of a step interrupted before its optimizer step (the store
        was lost mid-step), so a checkpoint saved now resumes at that step's batch."""
        if self.step_start is not None and self.step_started == trainer.step:
            trainer.sampler.load_state_dict(self.step_start)

    @classmethod
    def from_env(cls, cfg: Config) -> "Replicas":
        host, _, port = os.environ[STORE_ENV].rpartition(":")
        store = dist.TCPStore(host, int(port), None, False, timeout=timedelta(seconds=max(cfg.fault.step_timeout, 10.0)),
                              wait_for_workers=False)
        # A worker not started by the supervisor (another host, a test) numbers itself and joins.
        started_here = MEMBER_ENV in os.environ
        member = int(os.environ[MEMBER_ENV]) if started_here else store.add("ft/next_member", 1) - 1
        incarnation = int(os.environ.get(INCARNATION_ENV, 0)) if started_here else 1
        slot = int(os.environ.get(SLOT_ENV, -1))
        spec = os.environ.get(CHAOS_ENV)
        points = chaos.ChaosPoints(chaos.parse(spec), slot=slot, nproc=cfg.launch.nproc, seed=cfg.train.seed,
                                   claim=lambda k, gen: _claim(store, k, gen),
                                   fired_in=lambda k: _fired_in(store, k)) if spec else None
        sample_log = Path(os.environ[SAMPLE_LOG_ENV]) if os.environ.get(SAMPLE_LOG_ENV) else None
        return cls(store, member=member, slot=slot, incarnation=incarnation, cfg=cfg,
                   chaos_points=points, sample_log=sample_log)

    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def is_master(self) -> bool:
        """Rank 0 of the current generation saves checkpoints and publishes progress."""
        return self.rank == 0

    # -- store access: a lost store ends the job cleanly instead of hanging it -----------
    def _check(self, key: str) -> bool:
        try:
            return self.store.check([key])
        except (dist.DistNetworkError, ConnectionError) as err:
            raise StoreLost(f"membership store unreachable: {str(err).splitlines()[0]}") from None

    def _set(self, key: str, value: str) -> None:
        try:
            self.store.set(key, value)
        except (dist.DistNetworkError, ConnectionError) as err:
            raise StoreLost(f"membership store unreachable: {str(err).splitlines()[0]}") from None

    # -- the step ----------------------------------------------------------------------
    def begin_step(self, trainer) -> tuple[int, int]:
        """Join a generation if this worker has none (or its generation was aborted); returns
        this step's (dp_rank, dp_size)."""
        while self.needs_join or self._check(f"ft/gen/{self.gen}/abort"):
            self.needs_join = True
            try:
                self._join(trainer)
            except GenerationBroken as err:
                log.warning("generation %d broke while forming: %s", self.gen, err)
        self.step_start = trainer.sampler.state_dict()
        self.step_started = trainer.step
        self._set(f"ft/gen/{self.gen}/where/{self.rank}", f"step {trainer.step}: forward/backward")
        return self.rank, self.size

    def reduce(self, trainer, samples: int, loss: torch.Tensor) -> torch.Tensor | None:
        """Average gradients over the generation, weighted by each replica's sample count.
        Returns the global mean loss, or None when the step was abandoned (nothing applied)."""
        step = trainer.step
        params = list(trainer.model.parameters())
        reconfigure = 1.0 if self._check(f"ft/gen/{self.gen}/reconfigure") else 0.0
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        flat = torch.cat([flat * samples, torch.tensor([float(samples), float(loss) * samples, reconfigure])])
        try:
            self._fire("before", step)
            self._set(f"ft/gen/{self.gen}/where/{self.rank}", f"step {step}: in allreduce")
            work = self.pg.allreduce([flat])
            self._fire("during", step)
            self._wait(work, "allreduce", step)
            self._fire("after", step)
        except GenerationBroken as err:
            log.warning("step %d abandoned in generation %d: %s", step, self.gen, err)
            self.needs_join = True
            return None
        total = flat[-3]
        offset = 0
        for p in params:
            p.grad = (flat[offset:offset + p.numel()] / total).view_as(p)
            offset += p.numel()
        if flat[-1] > 0:  # the coordinator has joiners waiting: every member regroups after this step
            self.needs_join = True
        self._set("ft/progress", json.dumps({"step": step + 1, "loss": float(flat[-2] / total), "gen": self.gen,
                                              "size": self.size}))
        self._log_samples(trainer, step, flat[-2] / total)
        return flat[-2] / total

    def _fire(self, point: str, step: int, *, is_source: bool = False) -> None:
        if self.chaos is not None:
            self.chaos.fire(point, step, size=self.size, gen=self.gen, is_source=is_source)

    def _wait(self, work: dist.Work, op: str, step: int) -> None:
        """Wait for a collective, giving up when it fails, when the coordinator aborts this
        generation, or after step_timeout (then naming the ranks that never arrived)."""
        deadline = time.monotonic() + self.timeout.total_seconds()
        abort_key = f"ft/gen/{self.gen}/abort"
        while True:
            try:
                work.wait(POLL)
                return
            except RuntimeError:
                if work.is_completed():  # it failed (a peer died mid-way), or finished just after the poll
                    try:
                        work.wait()
                        return
                    except RuntimeError as err:
                        raise GenerationBroken(f"{op} failed: {str(err).splitlines()[0][:200]}") from None
            if self._check(abort_key):
                raise GenerationBroken("the coordinator aborted the generation (a member left)")
            if time.monotonic() > deadline:
                raise GenerationBroken(self._diagnose(op, step))

    def _diagnose(self, op: str, step: int) -> str:
        """Which ranks of this generation did not reach `op`, and where they were last seen."""
        expected = f"step {step}: in {op}"
        missing = []
        for rank, member in enumerate(self.members):
            key = f"ft/gen/{self.gen}/where/{rank}"
            seen = self.store.get(key).decode() if self._check(key) else "not started"
            if seen != expected:
                missing.append(f"rank {rank} (worker {member}) last seen '{seen}'")
        text = (f"step {step}: {op} timed out after {self.timeout.total_seconds():.1f}s; did not arrive: "
                + ("; ".join(missing) or "none (all arrived; the network or the collective stalled)"))
        log.error(text)
        return text

    def _log_samples(self, trainer, step: int, loss: torch.Tensor) -> None:
        if self.sample_log is None:
            return
        # The global batch of the step (every replica's share), so the check can compare records
        # of the same step across workers and spot a lost or repeated sample.
        sampler = ShardedSampler(trainer.sampler.num_samples, trainer.sampler.global_batch, trainer.sampler.seed)
        sampler.load_state_dict(self.step_start)
        ids = torch.cat([sampler.next_batch(0, 1) for _ in range(self.cfg.train.grad_accum)])
        # A digest of the parameters the step starts from: replicas in lockstep must agree on it.
        params = torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()])
        record = {"step": step, "t": time.time(), "member": self.member, "gen": self.gen, "size": self.size,
                  "epoch": self.step_start["epoch"], "params": hashlib.sha1(params.numpy().tobytes()).hexdigest(),
                  "loss": float(loss), "ids": ids.tolist()}
        with open(self.sample_log, "a") as f:
            f.write(json.dumps(record) + "\n")

    # -- membership --------------------------------------------------------------------
    def _join(self, trainer) -> None:
        """Ask the coordinator for the next generation, build its group, sync state if needed."""
        if self.pg is not None:
            self.abandoned.append(self.pg)
            self.pg = None
        self.seq += 1
        self._set(f"ft/ready/{self.member}", json.dumps({"seq": self.seq, "after": self.gen, "step": trainer.step,
                                                         "has_state": self.has_state}))
        log.info("asking to join after generation %d (step %d, %s)", self.gen, trainer.step,
                 "holding state" if self.has_state else "needing state")
        key = f"ft/assign/{self.member}/{self.seq}"
        try:
            self.store.wait([key], timedelta(seconds=self.cfg.fault.join_timeout))
            gen = int(self.store.get(key))
            info = json.loads(self.store.get(f"ft/gen/{gen}"))
        except dist.DistStoreError:
            raise RuntimeError(f"worker {self.member} was not admitted within fault.join_timeout = "
                               f"{self.cfg.fault.join_timeout}s") from None
        except (dist.DistNetworkError, ConnectionError) as err:
            raise StoreLost(f"membership store unreachable: {str(err).splitlines()[0]}") from None
        if info.get("stop"):
            raise JobStopped(info["stop"])
        self.gen, self.members = gen, info["members"]
        self.rank = self.members.index(self.member)
        started = time.perf_counter()
        try:
            self.pg = dist.ProcessGroupGloo(dist.PrefixStore(f"shoal/ft/pg/{gen}", self.store), self.rank,
                                            self.size, self.timeout)
        except RuntimeError as err:
            raise GenerationBroken(f"could not connect generation {gen}: {str(err).splitlines()[0][:200]}") from None
        if info["sync"]:
            self._transfer(trainer, self.members.index(info["source"]))
        self.needs_join = False
        log.info("generation %d: %d workers %s, this is rank %d at step %d (%.2fs%s)", gen, self.size,
                 self.members, self.rank, trainer.step, time.perf_counter() - started,
                 ", state from worker %d" % info["source"] if info["sync"] else "")

    def _transfer(self, trainer, source: int) -> None:
        """Broadcast the source's whole training state to the generation as one byte buffer.

        Members that already hold the source's state receive identical bytes, so even a
        broadcast cut short cannot corrupt them; nothing is copied in unless it completed."""
        buffer = pack_state(trainer)
        self._set(f"ft/gen/{self.gen}/where/{self.rank}", f"step {trainer.step}: in state transfer")
        options = dist.BroadcastOptions()
        options.rootRank = source
        work = self.pg.broadcast([buffer], options)
        self._fire("transfer", trainer.step, is_source=self.rank == source)
        self._wait(work, "state transfer", trainer.step)
        unpack_state(trainer, buffer)
        self.has_state = True
