"""DiLoCo across sites: the outer average travels over the cross-site plane, everything else stays inside.

Inside a site the workers are one DiLoCo replica (DDP over the site's own Gloo every step, so every
worker of the site holds the same pseudo-gradient). Every `inner_steps` steps the site's leader
(rank 0) sends its outer gradient, in the wire format of `sync.compression` (fp32, or the fp4 / top-k
encodings of shoal/sync/encoding.py), to the other sites over mutual TLS (shoal/sites/plane.py),
averages what came within `sites.grace_seconds` in site-name order, and broadcasts the mean inside
the site over Gloo; DiLoCo's outer step then runs unchanged on every worker. This replaces only
DiLoCo's `reduce_outer_gradient`, the one place an outer gradient crosses between replicas.

After each round the leader reports its outer model's digest to the other sites, serves the sites
that asked for its state, and, when it finds itself behind (restarted, or dropped from a round),
takes a running site's outer model and outer momentum (safetensors) and gives them to its workers.
With the model comes the map of the last inner step of each site whose outer gradient it holds
(shoal/sites/lineage.py; each outer gradient carries its sender's step). Taking a state discards this
site's own outer model, so the site continues at its own step in the map taken: every worker moves
its step and data position there (the Trainer's `move_to_outer_sync_step`), and the steps after it,
whose data is in no part of the model taken, are trained again on their own samples (log +
`site_data_reread`).
A resumed site whose checkpoint is older than its last step in the model taken moves on instead,
not reading those steps again (`site_data_skipped`).

DiLoCo: Douillard et al. 2023, arXiv 2311.08105.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from shoal.sites.lineage import SiteSteps
from shoal.sites.plane import SitePlane
from shoal.sync.diloco import DiLoCo
from shoal.sync.encoding import decode_average

log = logging.getLogger("shoal.sites")


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()


def average_in_order(rows: list[torch.Tensor]) -> torch.Tensor:
    """The mean of `rows` (sites in name order), each divided before summing: Gloo's all-reduce of DiLoCo's
    pre-divided fp32 gradients gives the same bits for two replicas. Elementwise, so a shard's average is
    the same bits as that slice of the whole average."""
    total = rows[0] / len(rows)
    for row in rows[1:]:
        total += row / len(rows)
    return total


class SitesDiLoCo(DiLoCo):
    """DiLoCo whose replicas are sites; `plane` is the site leader's (None on the other workers).

    `group` is the site's own process group: the leader's results are broadcast over it.
    `resumed`: a checkpoint will be loaded after entry, and the join check waits for it.
    `samples_per_step`: this site's share of a step's global batch (the samples an event counts).
    """

    def __init__(self, model: torch.nn.Module, inner_optimizer: torch.optim.Optimizer, *, plane: SitePlane | None,
                 join_timeout: float, resumed: bool = False, samples_per_step: int = 0, **diloco: Any):
        super().__init__(model, inner_optimizer, **diloco)
        if len(self.fragments) != 1 or self.overlap:
            raise ValueError("sites sync the whole model at once: fragments = 1, overlap = false")
        self.plane, self.join_timeout, self.resumed = plane, join_timeout, resumed
        self.site_members: list[str] = []  # the sites in the last outer average
        self._resync_from: str | None = None
        self._rounds_seen = 0
        self._round_handle: Any = None
        self.samples_per_step = samples_per_step
        self.site_steps = SiteSteps()
        """The leader's map of each site's last inner step whose outer gradient is in its outer model."""
        self._continue_at: int | None = None  # set when a state taken moved the step; the Trainer follows it

    # -- entry, exit, resume ------------------------------------------------------------------
    def __enter__(self) -> SitesDiLoCo:
        super().__enter__()
        # Registered after DiLoCo's own hook, so it runs after the outer step of a round.
        self._round_handle = self.inner_optimizer.register_step_post_hook(self._after_round)
        if self.plane is not None:
            self.plane.set_round(self.outer_syncs, self.outer_digest())
            self.plane.start()
            self.plane.wait_for_links(self.plane.grace)
        if not self.resumed:
            self._catch_up(None)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._round_handle.remove()
        super().__exit__(*exc_info)
        if self.plane is not None:
            self.plane.close()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "site_steps": dict(self.site_steps.steps)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.site_steps = SiteSteps(dict(state.get("site_steps", {})))
        self._rounds_seen = self.outer_syncs
        if self.plane is not None:
            self.plane.set_round(self.outer_syncs, self.outer_digest())
        # The other sites may have gone on while this one was down: a state taken says where to continue.
        self._catch_up(None)

    def step_to_continue_at(self) -> int | None:
        """The inner step the run continues at, once, after a state taken moved it (None otherwise): the
        Trainer moves its step and data position there (`Trainer.move_to_outer_sync_step`)."""
        step, self._continue_at = self._continue_at, None
        return step

    # -- the outer average --------------------------------------------------------------------
    def reduce_outer_gradient(self, fragment: Any, pseudo: torch.Tensor) -> torch.futures.Future[torch.Tensor]:
        encoding = fragment.encoding
        payload = encoding.encode(pseudo) if encoding is not None else pseudo
        average = torch.empty_like(pseudo)
        if self.plane is not None:
            # fp32 from 3 sites on travels in shards (sites/sharded.py); an encoding only as a whole.
            mean = (lambda rows: self._mean_bytes(rows, payload.dtype)) if encoding is None else None
            result = self.plane.exchange(self.outer_syncs + 1, tensor_bytes(payload), mean, payload.element_size(),
                                         step=self.inner_step)
            self._resync_from = result.resync_from
            if result.average is not None:
                average.copy_(torch.frombuffer(bytearray(result.average), dtype=pseudo.dtype).view_as(pseudo))
                self.site_members = result.members
            else:
                rows = {}
                for site, data in result.payloads.items():
                    row = self._parse(site, data, payload.dtype, payload.numel())
                    if row is not None:
                        rows[site] = row
                self.site_members = list(rows)
                if encoding is not None:
                    average.copy_(decode_average(torch.stack(list(rows.values())), encoding))
                else:
                    average.copy_(average_in_order(list(rows.values())))
            self.site_steps.averaged({site: result.steps[site] for site in self.site_members})
            if self.site_members != sorted([self.plane.name, *self.plane.peers]):
                log.info("site %s: outer round %d averaged over sites %s", self.plane.name, self.outer_syncs + 1,
                         ", ".join(self.site_members))
            else:
                log.info("site %s: outer round %d with every site", self.plane.name, self.outer_syncs + 1)
        if dist.get_world_size(self.group) > 1:
            dist.broadcast(average, group=self.group, group_src=0)
        done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        done.set_result(average)
        return done

    def _parse(self, site: str, data: bytes, dtype: torch.dtype, numel: int) -> torch.Tensor | None:
        """A site's payload (or shard) as `numel` values of `dtype`; None (logged) when it cannot be that."""
        expected = numel * dtype.itemsize
        if len(data) != expected:
            log.warning("site %s: ignored site %s's outer gradient of %d bytes, expected %d", self.plane.name, site,
                        len(data), expected)
            return None
        row = torch.frombuffer(bytearray(data), dtype=dtype).clone()
        if row.is_floating_point() and not torch.isfinite(row).all():
            log.warning("site %s: ignored site %s's outer gradient: it holds NaN or infinity", self.plane.name, site)
            return None
        return row

    def _mean_bytes(self, rows: dict[str, bytes], dtype: torch.dtype) -> bytes:
        """The sharded exchange's average of one shard: this site's row sets the size; the bad rows are left out."""
        numel = len(rows[self.plane.name]) // dtype.itemsize
        parsed = [row for site, data in rows.items() if (row := self._parse(site, data, dtype, numel)) is not None]
        if not parsed:  # even this site's own values are not finite: the shard stays as it is
            return rows[self.plane.name]
        return tensor_bytes(average_in_order(parsed))

    # -- after a round: report, serve joiners, catch up -----------------------------------------
    def _after_round(self, *_: Any) -> None:
        if self.outer_syncs == self._rounds_seen:
            return
        self._rounds_seen = self.outer_syncs
        if self.plane is not None:
            self.plane.finish_round(self.outer_syncs, self.outer_digest(), self.encode_state)
        source, self._resync_from = self._resync_from, None
        self._catch_up(source)

    def _catch_up(self, source: str | None) -> None:
        """Every worker of the site takes a running site's state when the leader finds this site behind, and
        continues at this site's own step in the state's map (`step_to_continue_at`)."""
        blob, rounds, taken = b"", 0, SiteSteps()
        if self.plane is not None:
            source = source or self.plane.ahead()
            if source is not None:
                log.warning("site %s: behind site %s (outer round %d here); asking for its state", self.plane.name,
                            source, self.outer_syncs)
                got = self.plane.take_state(source, self.join_timeout)
                if got is None:
                    log.error("site %s: no state from site %s within sites.join_timeout = %g s (its link was down "
                              "or kept being lost); training on alone", self.plane.name, source, self.join_timeout)
                else:
                    rounds, blob = got
        tensors: list[torch.Tensor] = []
        if blob:
            try:
                tensors, taken = self.decode_state(blob)
            except ValueError as err:  # refused: this site's workers must not wait for it
                log.error("site %s: refused the state from site %s: %s; training on alone", self.plane.name, source,
                          err)
                blob = b""
        # The round of the state taken (-1: none) and the step this site continues at: its own in the map.
        flag = torch.tensor([rounds if blob else -1, taken.step_of(self.plane.name) if blob else 0],
                            dtype=torch.int64)
        if dist.get_world_size(self.group) > 1:
            dist.broadcast(flag, group=self.group, group_src=0)
        if int(flag[0]) < 0:
            return
        if self.plane is None:
            tensors = self._empty_state()
        if dist.get_world_size(self.group) > 1:
            for tensor in tensors:
                dist.broadcast(tensor, group=self.group, group_src=0)
        own_rounds, own_step, step = self.outer_syncs, self.inner_step, int(flag[1])
        self._load_global(int(flag[0]), tensors)
        self.site_steps = taken
        if step != own_step:
            self.inner_step = self._continue_at = step
        if self.plane is not None:
            self._report_moved(source, own_rounds, own_step, step)
            log.info("site %s: joined at outer round %d with site %s's outer model and momentum", self.plane.name,
                     self.outer_syncs, source)
            self.plane.event("site_joined", site=self.plane.name, source=source, round=self.outer_syncs)
            self.plane.state_taken(self.outer_syncs, self.outer_digest(), self.encode_state)

    def _report_moved(self, source: str, own_rounds: int, own_step: int, step: int) -> None:
        """The leader took `source`'s state, which holds this site's steps up to `step`, in place of its own
        outer model (of round `own_rounds`, step `own_step`): say which steps' data is read again (or, after
        a resume from an older checkpoint, not read again)."""
        if step < own_step:
            first, last = step + 1, own_step
            samples = (last - first + 1) * self.samples_per_step
            log.warning("site %s: steps %d-%d (%d samples of this site's share) are not in site %s's global model "
                        "(this site's outer model of round %d held them; the state of round %d replaced it); "
                        "re-reading them", self.plane.name, first, last, samples, source, own_rounds,
                        self.outer_syncs)
            self.plane.event("site_data_reread", site=self.plane.name, first=first, last=last, samples=samples,
                             source=source, own_round=own_rounds, round=self.outer_syncs)
        elif step > own_step:
            log.warning("site %s: steps %d-%d are in site %s's global model already (averaged before this site "
                        "stopped; its checkpoint is of step %d): their data is not read again; continuing at step %d",
                        self.plane.name, own_step + 1, step, source, own_step, step)
            self.plane.event("site_data_skipped", site=self.plane.name, first=own_step + 1, last=step,
                             source=source, round=self.outer_syncs)

    # -- the global state ------------------------------------------------------------------------
    def _outer_and_momentum(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        fragment = self.fragments[0]
        momentum = [fragment.optimizer.state.get(o, {}).get("momentum_buffer") for o in fragment.outer]
        return fragment.outer, [m if m is not None else torch.zeros_like(o) for m, o in zip(momentum, fragment.outer)]

    def outer_digest(self) -> bytes:
        """SHA-256 of the outer model: equal digests mean the sites agree."""
        digest = hashlib.sha256()
        for outer in self.fragments[0].outer:
            digest.update(tensor_bytes(outer))
        return digest.digest()

    def encode_state(self) -> bytes:
        """The outer model, its momentum and the map of the steps it holds (in the safetensors metadata)."""
        outer, momentum = self._outer_and_momentum()
        return st_save({**{f"outer.{i}": o.contiguous() for i, o in enumerate(outer)},
                        **{f"momentum.{i}": m.contiguous() for i, m in enumerate(momentum)}},
                       metadata=self.site_steps.metadata())

    def _empty_state(self) -> list[torch.Tensor]:
        outer, momentum = self._outer_and_momentum()
        return [torch.empty_like(t) for t in outer + momentum]

    def decode_state(self, blob: bytes) -> tuple[list[torch.Tensor], SiteSteps]:
        """A STATE message as outer + momentum tensors, checked against this site's, and the steps of each site
        the model holds; ValueError when they differ or the map is missing."""
        outer, momentum = self._outer_and_momentum()
        try:
            received = st_load(blob)
        except Exception as err:  # safetensors raises its own error types for malformed bytes
            raise ValueError(f"malformed state from another site: {err}") from None
        names = [f"outer.{i}" for i in range(len(outer))] + [f"momentum.{i}" for i in range(len(momentum))]
        if sorted(received) != sorted(names):
            raise ValueError("the state from another site names other tensors: is it training the same model?")
        out = []
        for name, mine in zip(names, outer + momentum):
            got = received[name]
            if got.dtype != mine.dtype or got.shape != mine.shape or not torch.isfinite(got).all():
                raise ValueError(f"the state from another site has {name} of {got.dtype} {tuple(got.shape)}, "
                                 f"expected finite {mine.dtype} {tuple(mine.shape)}")
            out.append(got)
        return out, SiteSteps.from_safetensors(blob)

    @torch.no_grad()
    def _load_global(self, rounds: int, tensors: list[torch.Tensor]) -> None:
        fragment = self.fragments[0]
        count = len(fragment.outer)
        for outer, value in zip(fragment.outer, tensors[:count]):
            outer.copy_(value)
        if fragment.optimizer.defaults.get("momentum", 0) > 0:
            for outer, value in zip(fragment.outer, tensors[count:]):
                fragment.optimizer.state[outer]["momentum_buffer"] = value.clone()
        for param, outer in zip(fragment.local, fragment.outer):
            param.copy_(outer)
        self.outer_syncs = self._rounds_seen = rounds
