"""DiLoCo and Streaming DiLoCo: data parallelism that talks every H steps, not every step.

DiLoCo (Douillard et al. 2023, arXiv 2311.08105): every replica runs
`inner_steps` (H) steps of its own optimizer on its own data; then the replicas
average their *pseudo-gradients* (outer parameters minus local parameters) and
an outer optimizer, SGD with Nesterov momentum (lr 0.7, momentum 0.9), moves the
shared outer parameters. Communication drops by a factor of H.

Streaming DiLoCo (Douillard et al. 2025, arXiv 2501.18512) splits the
parameters into `fragments` synced in turn, fragment p at inner steps
t = (p + 1) * H / P (mod H), so the peak bandwidth is 1/P of the model's; with
`overlap` a fragment's all-reduce runs behind the next inner step and its
result replaces the local fragment one step late (the paper's mixing factor
alpha = 0). Pseudo-gradients may travel as fp16, bf16, int8 (INTELLECT-1,
arXiv 2412.01152) or int4 (Streaming DiLoCo): both papers found no error
feedback needed for them, so none is kept. Quantised pseudo-gradients travel
as one all-gather of every rank's codes where the sync overlaps the next step
(or with 2 replicas), else as an all-to-all plus an all-gather of the averaged
codes, half the bytes at 4 replicas (`quantized_reduce_scatter`).
`fp4` (shoal/sync/fp4.py, Streaming DiLoCo's 4-bit floats) and `topk` (shoal/sync/sparse.py,
SparseLoCo's top-k + 2-bit values with error feedback, arXiv 2508.15706) are outer-gradient
encodings (shoal/sync/encoding.py): each replica's payload is all-gathered and decoded in rank
order. Every wire format goes through one method, `reduce_outer_gradient`, the seam where
the outer average crosses between replicas.

Use it around an unmodified model and inner optimizer (torchft's style); the
training loop does not change:

    with DiLoCo(model, inner_opt, group=replicas, inner_steps=50, compression="int8"):
        for batch in loader:
            loss_fn(model(batch)).backward(); inner_opt.step(); inner_opt.zero_grad()
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from shoal.sync.compress import quantized_all_reduce, quantized_reduce_scatter
from shoal.sync.encoding import ENCODINGS, QUANTIZED, OuterEncoding, encoded_all_reduce, make_encoding
from shoal.sync.replica_state import load_replica_state, local_tensor, make_replicas_equal, replica_state

__all__ = ["DiLoCo", "Fragment", "local_tensor", "split_fragments"]

COMPRESSIONS = ("none", "fp16", "bf16", "int8", "int4", *ENCODINGS)
# The dtype a pseudo-gradient travels in for the casts among COMPRESSIONS (the elastic DiLoCo too).
WIRE_DTYPE = {"none": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def outer_warmup_factor(syncs_done: int, warmup_syncs: int) -> float:
    """The share of the outer lr used at the outer step after `syncs_done` syncs: a linear ramp
    over the first `warmup_syncs` outer steps (0: none)."""
    if warmup_syncs <= 0:
        return 1.0
    return min(1.0, (syncs_done + 1) / warmup_syncs)


def split_fragments(params: list[nn.Parameter], fragments: int) -> list[list[int]]:
    """Split parameters (in model order) into `fragments` contiguous runs of about equal size.

    Contiguous runs keep a fragment to neighbouring layers, as in Streaming DiLoCo.
    """
    if not 1 <= fragments <= len(params):
        raise ValueError(f"fragments = {fragments} must be between 1 and the {len(params)} parameter tensors")
    total = sum(p.numel() for p in params)
    runs: list[list[int]] = [[]]
    seen = 0
    for index, param in enumerate(params):
        unopened = fragments - len(runs)
        # Open the next fragment once this one holds its share, or when the tensors left are just enough.
        if runs[-1] and unopened and (seen >= total * len(runs) / fragments or len(params) - index <= unopened):
            runs.append([])
        runs[-1].append(index)
        seen += param.numel()
    return runs


class Fragment:
    """One fragment's outer parameters, outer optimizer, wire encoding and in-flight average."""

    def __init__(self, params: list[nn.Parameter], outer_lr: float, outer_momentum: float, nesterov: bool,
                 encoding: OuterEncoding | None = None):
        self.params = params
        self.encoding = encoding  # int8/int4/fp4/topk as one payload, with any error-feedback residual
        # With FSDP inside a replica each rank holds a shard (a DTensor); replicas average their
        # matching shards, so DiLoCo works on the local tensors, which share the parameters' memory.
        self.local = [local_tensor(p) for p in params]
        # Outer copies in fp32: the outer step must not round to the model's compute dtype.
        self.outer = [p.detach().clone().float() for p in self.local]
        self.optimizer = torch.optim.SGD(self.outer, lr=outer_lr, momentum=outer_momentum,
                                         nesterov=nesterov and outer_momentum > 0)
        self.pending: torch.futures.Future[torch.Tensor] | None = None

    def pseudo_gradient(self) -> torch.Tensor:
        """Outer minus local parameters, flat, in fp32: what the replicas average."""
        return torch.cat([(outer - p.float()).reshape(-1) for p, outer in zip(self.local, self.outer)])


class DiLoCo(contextlib.AbstractContextManager):
    """Context manager that turns data-parallel training into (streaming) DiLoCo.

    On entry every replica takes group rank 0's parameters (sent only if they differ);
    then a post-hook on `inner_optimizer.step` counts inner steps and syncs each
    fragment when due.
    A subclass changes how replicas meet through three hooks: `start_equal` (entry),
    `reduce_outer_gradient` (the average) and `outer_stepped` (after an outer step); `sync`
    runs a fragment's sync outside the inner-step hook.
    `group` is the process group of replicas (e.g. the `dp_replicate` mesh
    axis); inside a replica the model may itself be DDP/FSDP over another axis.
    `outer_warmup` ramps the outer lr linearly over that many outer steps (0: none);
    `topk_fraction`/`topk_bits` shape the `topk` encoding. shoal/sync/outer_settings.py holds
    the outer settings tuned per replica count and H that `sync.method = "diloco"` uses.
    """

    def __init__(self, model: nn.Module, inner_optimizer: torch.optim.Optimizer, *,
                 group: dist.ProcessGroup | None = None, inner_steps: int = 50, outer_lr: float = 0.7,
                 outer_momentum: float = 0.9, nesterov: bool = True, compression: str = "none",
                 fragments: int = 1, overlap: bool = False, topk_fraction: float = 0.02, topk_bits: int = 2,
                 outer_warmup: int = 0):
        if inner_steps < 1:
            raise ValueError(f"inner_steps = {inner_steps} must be at least 1")
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression = {compression!r} is not one of {', '.join(COMPRESSIONS)}")
        if fragments > inner_steps:
            raise ValueError(f"fragments = {fragments} must be at most inner_steps = {inner_steps}")
        self.model = model
        self.inner_optimizer = inner_optimizer
        self.group = group or dist.group.WORLD
        self.inner_steps = inner_steps
        self.compression = compression
        self.overlap = overlap
        self.outer_lr = outer_lr
        self.outer_warmup = outer_warmup  # outer steps of linear outer-lr ramp; 0 means none
        params = [p for p in model.parameters() if p.requires_grad]
        runs = split_fragments(params, fragments)

        def encoding(run: list[int]) -> OuterEncoding | None:
            if compression not in ENCODINGS + QUANTIZED:
                return None
            numel = sum(local_tensor(params[i]).numel() for i in run)
            return make_encoding(compression, numel, topk_fraction=topk_fraction, topk_bits=topk_bits)

        self.fragments = [Fragment([params[i] for i in run], outer_lr, outer_momentum, nesterov, encoding(run))
                          for run in runs]
        """The model's parameters as synced together, fragment by fragment, with their outer state."""
        self.inner_step = 0  # inner steps taken inside this context
        self.outer_syncs = 0  # fragment syncs completed
        self._handle: Any = None

    def due(self, step: int) -> list[int]:
        """Fragments synced after inner step `step` (counted from 1 inside the context)."""
        # Fragment i syncs at inner steps t = (i + 1) * H / P (mod H), as in Streaming DiLoCo.
        count, every = len(self.fragments), self.inner_steps
        return [i for i in range(count) if step % every == (i + 1) * every // count % every]

    def __enter__(self) -> DiLoCo:
        self.start_equal()
        with torch.no_grad():
            for fragment in self.fragments:
                for param, outer in zip(fragment.local, fragment.outer):
                    outer.copy_(param)
        self._handle = self.inner_optimizer.register_step_post_hook(self._after_inner_step)
        return self

    def start_equal(self) -> None:
        """Make the replicas equal on entry, before the outer parameters are taken: rank 0 of `group`
        sends its parameters where they differ. A subclass whose replicas start equal by other means
        (one seed, a state transfer) replaces it."""
        # Replicas must start equal, or the first average mixes unrelated models.
        make_replicas_equal([param for fragment in self.fragments for param in fragment.local], self.group)

    def __exit__(self, *exc_info: Any) -> None:
        self._handle.remove()
        if exc_info[0] is None:
            # Finish in-flight syncs so the replicas leave the context equal where they synced.
            for fragment in self.fragments:
                self._finish(fragment)

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to repeat this one: outer parameters, outer momentum,
        the step counts, any average still in flight, and this replica's own parameters and
        inner-optimizer state (replicas differ between syncs, which a DCP checkpoint cannot hold).

        Tensors and numbers only, so it loads with `torch.load(weights_only=True)`.
        """
        fragments = []
        for fragment in self.fragments:
            # Waiting for an in-flight average does not apply it: the resumed run applies it
            # at the same step as the uninterrupted one would.
            pending = fragment.pending.wait() if fragment.pending is not None else None
            fragments.append({"outer": [o.detach().clone() for o in fragment.outer],
                              "optimizer": fragment.optimizer.state_dict(), "pending": pending,
                              "encoding": fragment.encoding.state_dict() if fragment.encoding else {}})
        return {"inner_step": self.inner_step, "outer_syncs": self.outer_syncs, "fragments": fragments,
                "replica": replica_state(self.model, self.inner_optimizer)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`; call it inside the context (entry broadcasts rank 0's model)."""
        if len(state["fragments"]) != len(self.fragments):
            raise ValueError(f"saved state has {len(state['fragments'])} fragments, this DiLoCo "
                             f"{len(self.fragments)}")
        self.inner_step, self.outer_syncs = int(state["inner_step"]), int(state["outer_syncs"])
        load_replica_state(self.model, self.inner_optimizer, state["replica"])
        for fragment, saved in zip(self.fragments, state["fragments"]):
            with torch.no_grad():
                for outer, value in zip(fragment.outer, saved["outer"]):
                    if outer.shape != value.shape:
                        raise ValueError(f"saved outer parameters of shape {tuple(value.shape)} do not fit "
                                         f"{tuple(outer.shape)}: resume DiLoCo on the layout it was saved on")
                    outer.copy_(value)
            fragment.optimizer.load_state_dict(saved["optimizer"])
            if fragment.encoding is not None and saved.get("encoding"):
                fragment.encoding.load_state_dict(saved["encoding"])
            fragment.pending = None
            if saved["pending"] is not None:
                fragment.pending = torch.futures.Future()
                fragment.pending.set_result(saved["pending"])

    def _after_inner_step(self, *_: Any) -> None:
        self.inner_step += 1
        # A sync started one step ago (overlap) is applied now, after that step's local update.
        for fragment in self.fragments:
            self._finish(fragment)
        for index in self.due(self.inner_step):
            if self.overlap:
                self._start(self.fragments[index])
            else:
                self.sync(self.fragments[index])

    def sync(self, fragment: Fragment) -> None:
        """Sync `fragment` now: average its pseudo-gradient, take the outer step, put the result into the model."""
        self._start(fragment)
        self._finish(fragment)

    @torch.no_grad()
    def _start(self, fragment: Fragment) -> None:
        """Send this fragment's pseudo-gradient (outer minus local) to the averaging."""
        fragment.pending = self.reduce_outer_gradient(fragment, fragment.pseudo_gradient())

    def reduce_outer_gradient(self, fragment: Fragment, pseudo: torch.Tensor) -> torch.futures.Future[torch.Tensor]:
        """The mean over the replicas (`self.group`) of this fragment's flat fp32 pseudo-gradient,
        travelling in `self.compression`; a future, so the sync may overlap the next inner step.

        The one place an outer gradient crosses between replicas: a transport between sites
        replaces this method (same input, same result on every replica).
        """
        if self.compression in ENCODINGS:
            return encoded_all_reduce(fragment.encoding.encode(pseudo), fragment.encoding, self.group)
        if self.compression in QUANTIZED:
            bits = int(self.compression[3:])
            if self.overlap or dist.get_world_size(self.group) <= 2:
                # One all-gather, left to run behind the next inner step (same bytes as below at 2).
                return quantized_all_reduce(pseudo, bits, self.group)
            # Waited for anyway: all-to-all + all-gather send half the all-gather's bytes at 4 ranks.
            done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
            done.set_result(quantized_reduce_scatter(pseudo, bits, self.group))
            return done
        wire = pseudo.to(WIRE_DTYPE[self.compression])
        # Divide before summing: fp16 would overflow on sums of large values.
        wire.div_(dist.get_world_size(self.group))
        work = dist.all_reduce(wire, group=self.group, async_op=True)
        return work.get_future().then(lambda _: wire.float())

    @torch.no_grad()
    def _finish(self, fragment: Fragment) -> None:
        """Wait for the average, take the outer step and put the outer parameters into the model."""
        if fragment.pending is None:
            return
        average = fragment.pending.wait()
        fragment.pending = None
        start = 0
        for outer in fragment.outer:
            outer.grad = average[start:start + outer.numel()].view_as(outer)
            start += outer.numel()
        # Fragments sync in turn, so each has taken outer_syncs // fragments outer steps before this one.
        syncs_done = self.outer_syncs // len(self.fragments)
        for group in fragment.optimizer.param_groups:
            group["lr"] = self.outer_lr * outer_warmup_factor(syncs_done, self.outer_warmup)
        fragment.optimizer.step()
        for param, outer in zip(fragment.local, fragment.outer):
            param.copy_(outer)
        self.outer_syncs += 1
        self.outer_stepped(fragment)

    def outer_stepped(self, fragment: Fragment) -> None:
        """After `fragment`'s outer step put the outer parameters into the model: nothing here; a
        subclass may record it."""
