"""Apply the configured parallel techniques to a model, in one fixed order.

The Trainer sees the result only as a `ParallelModel`: which modules this rank holds, how
to run forward and backward on a micro-batch, and how to skip gradient sync between
micro-batches. A new technique is a new file in this folder plus its line here.
`check_layout` refuses a layout the model cannot take before any worker starts.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Callable, ContextManager

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from shoal.config import COMPRESSION_HOOKS, Config, ConfigError, TrainConfig, site_peers
from shoal.models import Loss, call_model
from shoal.runtime.mesh import ParallelDims
from shoal.runtime.lazy import dtensor_type

log = logging.getLogger("shoal")


@dataclass
class ParallelModel:
    """A model spread over the mesh, as the Trainer uses it."""

    module: nn.Module
    """What forward runs: the model itself, or its DDP wrapper."""
    model_parts: list[nn.Module]
    """The unwrapped modules this rank holds (several pipeline stages under interleaved PP)."""
    no_sync: Callable[[], ContextManager] = field(default=contextlib.nullcontext)
    """Context in which backward does not synchronise gradients (all but the last micro-batch)."""
    ddp: nn.Module | None = None
    """The DDP wrapper, when there is one, for gradient comm hooks."""
    pp_group: dist.ProcessGroup | None = None
    """The pipeline group, when the model is split into stages: gradient norms sum over it."""
    loss: Loss = field(default_factory=Loss)
    """The configured loss (model.loss), called as loss(output, inputs, targets)."""

    def parameters(self):
        for part in self.model_parts:
            yield from part.parameters()

    def _loss(self, inputs, targets: torch.Tensor | None, items: torch.Tensor | None = None) -> torch.Tensor:
        # inputs: a tensor or a dict of tensors (input_ids, attention_mask, pixel_values...)
        output = call_model(self.module, inputs, targets if self.loss.wants_labels else None)
        return self.loss(output, inputs, targets, items)

    def forward_backward(self, inputs, targets: torch.Tensor | None, loss_scale: float,
                         items: torch.Tensor | None = None) -> torch.Tensor:
        """Forward, loss and backward on one micro-batch; returns the unscaled loss, detached.
        `items`: the loss is the sum over the targets that count divided by it (Loss.__call__)."""
        loss = self._loss(inputs, targets, items)
        (loss if loss_scale == 1.0 else loss * loss_scale).backward()
        return loss.detach()

    @torch.no_grad()
    def evaluate(self, inputs, targets: torch.Tensor | None, items: torch.Tensor | None = None) -> torch.Tensor:
        return self._loss(inputs, targets, items)

    def train(self, mode: bool = True) -> None:
        for part in self.model_parts:
            part.train(mode)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale all gradients so their global 2-norm is at most `max_norm`; returns the norm
        before clipping. Sharded (DTensor) gradients count once, whole, and pipeline stages
        add their parts, so every rank sees the norm of the full model's gradient."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        # one norm per (mesh, placements) group: DTensor's reduction of a group's partial norm
        # is a single collective, where one per gradient would be hundreds
        groups: dict[object, list[torch.Tensor]] = {}
        skip = self._norm_skip()
        for g in (p.grad for p in self.parameters() if p.grad is not None and id(p) not in skip):
            key = (g.device_mesh, g.placements) if isinstance(g, dtensor_type()) else None
            groups.setdefault(key, []).append(g)
        squares = torch.zeros((), dtype=torch.float64)
        for key, members in groups.items():
            norm = torch.nn.utils.get_total_norm(members, 2.0)
            if isinstance(norm, dtensor_type()):
                norm = norm.full_tensor()
            squares += norm.double().cpu() ** 2
        if self.pp_group is not None:
            squares = squares.to(grads[0].device if grads else "cpu")
            dist.all_reduce(squares, group=self.pp_group)
        total = squares.sqrt().float()
        coef = min(1.0, max_norm / (float(total) + 1e-6))
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)
        return total

    def _norm_skip(self) -> set[int]:
        """Parameters left out of the gradient norm (copies another rank counts)."""
        return set()


@dataclass
class PipelineModel(ParallelModel):
    """A model split into pipeline stages: forward and backward run the whole schedule."""

    schedule: object = None
    """The torch.distributed.pipelining schedule that runs this rank's stages."""
    has_first: bool = False
    has_last: bool = False
    last_rank: int = 0
    """Global rank of the pp-group member that holds the last stage (it computes the loss)."""
    loss_scale: float = 1.0
    microbatches: int = 1
    """The schedule's micro-batches per step (parallel.pp_microbatches)."""
    items: torch.Tensor | None = None
    """This step's count of items per data-parallel rank, when the loss is a sum divided by it."""
    tied: list[list[nn.Parameter]] = field(default_factory=list)
    """Per tied-weight group (GPT-2's input and output embeddings), this rank's copies: their
    gradients are summed over the pipeline group, whose first and last stage each hold one."""
    tied_shapes: list[tuple[int, ...]] = field(default_factory=list)
    """The local shape of each tied group's gradient, for a rank holding no copy of it."""
    sync_tied: bool = True

    @contextlib.contextmanager
    def _accumulating(self):
        # between micro-batches the tied gradients keep accumulating; summed once, on the last
        self.sync_tied = False
        try:
            yield
        finally:
            self.sync_tied = True

    def _norm_skip(self) -> set[int]:
        # a tied weight's gradient is the same on each stage holding it: counted on the first only
        return set() if self.has_first else {id(p) for params in self.tied for p in params}

    def _sum_tied_grads(self) -> None:
        for params, shape in zip(self.tied, self.tied_shapes):
            local = [p.grad.to_local() if isinstance(p.grad, dtensor_type()) else p.grad
                     for p in params if p.grad is not None]
            total = torch.stack(local).sum(0) if local else None
            if total is None:  # this rank holds no copy (a middle stage): it adds zeros
                total = torch.zeros(shape)
            dist.all_reduce(total, group=self.pp_group)
            for g in local:
                g.copy_(total)

    first_checked: bool = False

    def loss_fn(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # the last stage sees only its output and the targets: a custom loss gets {"targets": ...}.
        # The schedule first calls this on placeholder tensors to infer shapes; the value is
        # checked in _run instead, on the real loss.
        self.loss.checked = True
        if self.items is not None:
            # a sum over this micro-batch's items / the step's count: the schedule divides the
            # gradients by its micro-batch count, which this factor undoes
            return self.loss(output, {}, target, self.items) * self.microbatches * self.loss_scale
        return self.loss(output, {}, target) * self.loss_scale

    def _run(self, step, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        losses: list[torch.Tensor] = []
        args = (inputs,) if self.has_first else ()
        kwargs = {"target": targets, "losses": losses} if self.has_last else {}
        step(*args, **kwargs)
        # only the last stage saw the loss; the Trainer wants it on every rank
        loss = (torch.stack([x.detach().float() for x in losses]).mean() / self.loss_scale if self.has_last
                else torch.zeros((), device=inputs.device))
        dist.broadcast(loss, src=self.last_rank, group=self.pp_group)
        if not self.first_checked:  # every rank checks the broadcast value, so all stop together
            self.first_checked = True
            self.loss._check(loss)
        return loss

    def forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor, loss_scale: float,
                         items: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(inputs, dict):
            raise ConfigError("parallel.pp: pipeline stages take a tensor of token ids; this data gives a dict "
                              f"({', '.join(inputs)}); use parallel.pp = 1")
        self.loss_scale, self.items = loss_scale, items
        loss = self._run(self.schedule.step, inputs, targets)
        if self.tied and self.sync_tied:
            self._sum_tied_grads()
        return loss

    @torch.no_grad()
    def evaluate(self, inputs: torch.Tensor, targets: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        self.loss_scale, self.items = 1.0, items
        return self._run(self.schedule.eval, inputs, targets)


def parallelize(model: nn.Module, dims: ParallelDims, mesh: DeviceMesh | None, cfg: Config,
                device: torch.device, *, replicate_gradients: bool = True) -> ParallelModel:
    """Apply the techniques `dims` asks for. `replicate_gradients=False` leaves the
    data-parallel axis alone for methods that average parameters instead (DiLoCo, local SGD)."""
    from shoal.parallel.activation import apply_ac
    from shoal.parallel.compile import apply_compile
    if not any(p.is_meta for p in model.parameters()):  # meta parameters get their memory after the split
        model.to(device)
    loss = Loss(cfg.model.loss)
    par = cfg.parallel
    if dims.world_size == 1 or mesh is None:
        apply_ac(model, par.activation_checkpointing, par.shard_modules)
        if par.compile:
            apply_compile(model, par.shard_modules)
        return ParallelModel(module=model, model_parts=[model], loss=loss)

    # 1. Tensor parallel first: it swaps weights for DTensors on the "tp" axis, and every
    #    later step (stage split, checkpointing, compile, FSDP) then wraps those as they are.
    if dims.tp > 1:
        from shoal.parallel.stages import STAGES_PER_RANK
        from shoal.parallel.tensor import apply_tp
        apply_tp(model, mesh["tp"], pipeline_stages=dims.pp * STAGES_PER_RANK[par.pp_schedule])
    # 2. Pipeline split: each rank keeps its stages; what follows is applied per stage.
    parts = [model]
    tied: list[tuple[list[str], tuple[int, ...]]] = []
    if dims.pp > 1:
        from shoal.parallel.hf_pipeline import tied_names
        from shoal.parallel.pipeline import apply_pp
        params = dict(model.named_parameters(remove_duplicate=False))
        tied = [(names, tuple(params[names[0]].shape)) for names in tied_names(model)]
        parts = apply_pp(model, mesh["pp"], par.pp_schedule)
    # 3. Activation checkpointing, then 4. compile: compile after checkpointing so the
    #    recomputation is traced into the compiled graph, and before FSDP so FSDP's
    #    all-gather hooks stay outside the graphs.
    for part in parts:
        apply_ac(part, par.activation_checkpointing, par.shard_modules)
        if par.compile:
            apply_compile(part, par.shard_modules)
    # 5. Data parallel last: it must see the final modules and parameters (FSDP shards the
    #    TP-split DTensors again along the data axis; DDP needs plain tensors).
    pm_fields: dict = {}
    dp_mesh = _data_parallel_mesh(dims, mesh, replicate_gradients)
    if dims.dp > 1 and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        # torch's SyncBatchNorm runs on GPUs only; said once, at start, rather than left silent
        log.warning("BatchNorm: each of the %d data-parallel ranks normalises with the statistics of its own "
                    "share of the batch, so the loss differs from one process on the same global batch", dims.dp)
    if dp_mesh is not None and (dims.dp_shard > 1 or dims.tp > 1 or dims.pp > 1):
        from shoal.parallel.shard import apply_fsdp
        bf16 = cfg.train.precision == "bf16"
        for part in parts:
            # reduce in fp32 even with bf16 compute: summing N bf16 gradients loses the low bits
            apply_fsdp(part, dp_mesh, param_dtype=torch.bfloat16 if bf16 else None,
                       reduce_dtype=torch.float32 if bf16 else None, cpu_offload=par.cpu_offload,
                       shard_modules=par.shard_modules)
        if dims.pp == 1:  # pipeline stages switch FSDP's gradient sync themselves, per schedule step
            pm_fields["no_sync"] = lambda: _fsdp_no_sync(parts)
    elif dp_mesh is not None:
        from shoal.parallel.data import apply_ddp
        ddp = apply_ddp(model, dp_mesh, device)
        return ParallelModel(module=ddp, model_parts=[model], no_sync=ddp.no_sync, ddp=ddp, loss=loss)

    pm_fields["loss"] = loss
    if dims.pp > 1:
        pm = _pipeline_model(parts, mesh["pp"], cfg, device, pm_fields)
        for names, shape in tied:
            # the parameters as they are now (FSDP swapped them for DTensors), one per object
            held = {id(p): p for part in parts for n, p in part.named_parameters(remove_duplicate=False)
                    if n in names}
            pm.tied.append(list(held.values()))
            if dp_mesh is not None and dims.dp_shard > 1:  # FSDP keeps a dim-0 chunk per rank
                shape = tuple(torch.empty(shape, device="meta").chunk(dims.dp_shard)[
                    dp_mesh.get_local_rank(mesh_dim=dp_mesh.ndim - 1)].shape)
            pm.tied_shapes.append(shape)
        if tied:
            pm.no_sync = pm._accumulating
        return pm
    return ParallelModel(module=model, model_parts=parts, **pm_fields)


def _data_parallel_mesh(dims: ParallelDims, mesh: DeviceMesh, replicate_gradients: bool) -> DeviceMesh | None:
    """The mesh gradients are reduced over: "dp_shard" alone (FSDP), both data axes (HSDP;
    with dp_shard = 1 that is plain replication through FSDP, which unlike DDP takes the
    DTensors of TP), or none."""
    if not replicate_gradients:  # DiLoCo/local SGD own the replica axis; sharding stays
        return mesh["dp_shard"] if dims.dp_shard > 1 else None
    if dims.dp == 1:
        return None
    if dims.dp_shard > 1 or dims.tp > 1 or dims.pp > 1:
        return mesh["dp_shard"] if dims.dp_replicate == 1 else mesh["dp_replicate", "dp_shard"]
    return mesh["dp"]


@contextlib.contextmanager
def _fsdp_no_sync(parts: list[nn.Module]):
    # FSDP keeps unsharded gradients and skips the reduce-scatter until sync is turned back on
    for part in parts:
        part.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        for part in parts:
            part.set_requires_gradient_sync(True)


def _pipeline_model(parts: list[nn.Module], pp_mesh: DeviceMesh, cfg: Config, device: torch.device,
                    pm_fields: dict) -> PipelineModel:
    from shoal.parallel.pipeline import STAGES_PER_RANK, build_schedule, stage_ids
    pp, rank = pp_mesh.size(), pp_mesh.get_local_rank()
    ids = stage_ids(rank, pp, cfg.parallel.pp_schedule)
    n_stages = pp * STAGES_PER_RANK[cfg.parallel.pp_schedule]
    group = pp_mesh.get_group()
    pm = PipelineModel(module=parts[0], model_parts=parts, pp_group=group, has_first=0 in ids,
                       has_last=n_stages - 1 in ids, last_rank=dist.get_global_rank(group, pp - 1),
                       microbatches=cfg.parallel.pp_microbatches,
                       **pm_fields)
    pm.schedule = build_schedule(parts, pp_mesh, cfg.parallel.pp_schedule, cfg.parallel.pp_microbatches,
                                 device, pm.loss_fn)
    return pm


def check_layout(cfg: Config, world_size: int) -> ParallelDims:
    """Resolve the parallel degrees for `world_size` ranks and refuse, with a ConfigError
    naming the field and what would be valid, any layout the model cannot take. Called by
    the launcher before any worker starts, and by `shoal plan` for every candidate."""
    from shoal.parallel.stages import STAGES_PER_RANK
    par = cfg.parallel
    dims = ParallelDims.from_config(par, world_size)
    sites = 1 + len(site_peers(cfg)) if cfg.sites.name else 1  # each site reads an equal share of the batch
    if par.pp_schedule not in STAGES_PER_RANK:
        raise ConfigError(f"parallel.pp_schedule = {par.pp_schedule!r} is not one of {', '.join(STAGES_PER_RANK)}")
    model = "hf" if cfg.model.hf else "factory" if cfg.model.factory else cfg.model.name
    if model == "hf":
        from shoal.parallel.hf_layout import check_hf_layout
        check_hf_layout(cfg.model.hf, par.shard_modules, dims.tp, dims.pp * STAGES_PER_RANK[par.pp_schedule])
    # a factory's model is known only once a worker builds it: TP and PP then need a Hugging
    # Face model (shoal/parallel/tensor.py and pipeline.py refuse others with a ConfigError)
    if dims.tp > 1 and model not in ("gpt", "mlp", "dlrm", "hf", "factory"):
        raise ConfigError(f"parallel.tp = {dims.tp}: model.name = '{model}' has no tensor-parallel plan; "
                          f"use parallel.tp = 1 (FSDP with parallel.dp_shard shards any model)")
    if dims.pp > 1 and model not in ("gpt", "hf", "factory"):
        raise ConfigError(f"parallel.pp = {dims.pp}: pipeline stages split transformer layers, which only "
                          f"model.name = 'gpt' (or a Hugging Face decoder) has; use parallel.pp = 1")
    sizes = model_sizes(cfg) if model not in ("hf", "factory") else {}
    if model == "gpt":
        if sizes["n_heads"] % dims.tp:
            raise ConfigError(f"parallel.tp = {dims.tp} must divide model.n_heads = {sizes['n_heads']} (each rank "
                              f"holds whole heads); valid: {_divisors(sizes['n_heads'])}")
        if cfg.data.seq_len % dims.tp:
            raise ConfigError(f"parallel.tp = {dims.tp} must divide data.seq_len = {cfg.data.seq_len} (sequence "
                              f"parallelism splits the sequence)")
        stages = dims.pp * STAGES_PER_RANK[par.pp_schedule]
        if stages > sizes["n_layers"]:
            per_rank = STAGES_PER_RANK[par.pp_schedule]
            raise ConfigError(f"parallel.pp = {dims.pp} with pp_schedule = '{par.pp_schedule}' needs {stages} "
                              f"stages ({per_rank} per rank) but the model has model.n_layers = "
                              f"{sizes['n_layers']}; use parallel.pp <= {sizes['n_layers'] // per_rank}")
    elif model == "mlp" and sizes["dim"] % dims.tp:
        raise ConfigError(f"parallel.tp = {dims.tp} must divide model.dim = {sizes['dim']}; "
                          f"valid: {_divisors(sizes['dim'])}")
    if dims.pp > 1:
        m = par.pp_microbatches
        if par.pp_schedule == "1f1b" and m < dims.pp:
            raise ConfigError(f"parallel.pp_microbatches = {m} must be at least parallel.pp = {dims.pp} for "
                              f"the 1f1b schedule")
        if par.pp_schedule == "interleaved_1f1b" and m % dims.pp:
            raise ConfigError(f"parallel.pp_microbatches = {m} must be a multiple of parallel.pp = {dims.pp} "
                              f"for the interleaved_1f1b schedule")
        per_rank_batch = cfg.train.batch_size // sites // max(1, dims.dp) // cfg.train.grad_accum
        if per_rank_batch % m:
            raise ConfigError(f"parallel.pp_microbatches = {m} must divide the per-rank micro-batch "
                              f"(train.batch_size {cfg.train.batch_size} / {sites} site(s) / {dims.dp} data-parallel "
                              f"ranks / train.grad_accum {cfg.train.grad_accum} = {per_rank_batch})")
    check_batch_split(cfg.train, dims.dp, sites)
    if par.cpu_offload and dims.dp_shard == 1:
        raise ConfigError("parallel.cpu_offload offloads FSDP shards and needs parallel.dp_shard > 1")
    if cfg.sync.method in COMPRESSION_HOOKS and (dims.tp > 1 or dims.pp > 1 or dims.dp_shard > 1):
        raise ConfigError(f"sync.method = '{cfg.sync.method}' is a DDP comm hook; it needs parallel.tp = "
                          f"parallel.pp = parallel.dp_shard = 1 (tp and pp reduce gradients through FSDP)")
    return dims


def check_batch_split(train: TrainConfig, dp: int, sites: int = 1) -> None:
    """The global batch must split evenly into `dp` data-parallel ranks x train.grad_accum micro-batches;
    across `sites` sites, into equal shares per site first, each of them into this site's `dp` ranks
    (shoal/data/sampler.py's place_in_sites: the split every site agrees on whatever the others' sizes)."""
    if sites > 1 and train.batch_size % (sites * dp * train.grad_accum):
        raise ConfigError(f"train.batch_size = {train.batch_size} must split into {sites} equal shares, one per "
                          f"site (sites.name and sites.peers), and each share into this site's {dp} data-parallel "
                          f"ranks x train.grad_accum = {train.grad_accum} micro-batches: use a multiple of "
                          f"{sites * dp * train.grad_accum}")
    if train.batch_size % (dp * train.grad_accum):
        raise ConfigError(f"train.batch_size = {train.batch_size} must divide into {dp} data-parallel ranks "
                          f"(dp_replicate x dp_shard) x train.grad_accum = {train.grad_accum} micro-batches")


def model_sizes(cfg: Config) -> dict[str, int]:
    """The model's dim, n_layers and n_heads with the flavour's defaults filled in."""
    if cfg.model.name == "gpt":
        from shoal.models.gpt import FLAVOURS
    elif cfg.model.name == "mlp":
        from shoal.models.mlp import FLAVOURS
    else:
        from shoal.models.dlrm import FLAVOURS
    preset = FLAVOURS[cfg.model.flavour]
    return {key: getattr(cfg.model, key, 0) or preset.get(key, 0) for key in ("dim", "n_layers", "n_heads")}


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)
