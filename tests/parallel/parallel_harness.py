"""Helpers for the multi-process parallel tests: train a layout for a few steps through the
real `Trainer.train_step` (its sampler split, micro-batching, gradient clipping, learning-rate
schedule and optimizer), and compare it with one process of plain torch on the same global
batches."""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from shoal.config import Config
from shoal.models import build_model, compute_loss
from shoal.data.spec import DataSpec
from shoal.parallel.compose import check_layout, parallelize
from shoal.plan.measure import SavedActivations, state_bytes

VOCAB, SEQ, BATCH, STEPS = 64, 16, 8, 5
SAVE_AT = 3  # reshard tests: checkpoint after this many steps, resume there on another layout


def gpt_config(**parallel) -> Config:
    cfg = Config()
    cfg.model.name, cfg.model.flavour = "gpt", "debug"
    cfg.model.dim, cfg.model.n_layers, cfg.model.n_heads = 32, 4, 4
    cfg.data.seq_len = SEQ
    cfg.train.batch_size, cfg.train.lr, cfg.train.steps, cfg.train.warmup_steps = BATCH, 3e-3, STEPS, 0
    cfg.parallel.dp_replicate = 1
    cfg.parallel.pp_microbatches = 2
    for key, value in parallel.items():
        setattr(cfg.parallel, key, value)
    return cfg


def dlrm_config(**parallel) -> Config:
    cfg = gpt_config(**parallel)
    cfg.model.name, cfg.data.source, cfg.data.num_samples = "dlrm", "clicks", 256
    return cfg


def click_batches(steps: int = STEPS, seed: int = 0):
    from shoal.data.clicks import build_clicks
    train, _, spec = build_clicks(dlrm_config().data, seed)
    g = torch.Generator().manual_seed(seed)
    return [train.get(torch.randint(0, len(train), (BATCH,), generator=g)) for _ in range(steps)], spec


def token_batches(steps: int = STEPS, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        window = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
        out.append((window[:, :-1], window[:, 1:]))
    return out


def build(cfg: Config, spec: DataSpec | None = None) -> torch.nn.Module:
    torch.manual_seed(cfg.train.seed)
    return build_model(cfg.model, spec or DataSpec(kind="tokens", vocab_size=VOCAB, seq_len=SEQ))


def reference(cfg: Config, batches, spec=None, clip: float = 1.0) -> tuple[list[float], dict[str, torch.Tensor]]:
    """One process, whole global batches, plain torch: the curve every layout must reproduce,
    then the trained model's loss on the first batch (checks `evaluate`)."""
    from shoal.train import build_optimizer, lr_at
    model = build(cfg, spec)
    opt = build_optimizer(model.parameters(), cfg.train)
    losses = []
    for step, (x, y) in enumerate(batches):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.train)
        opt.zero_grad()
        loss = compute_loss(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():  # held-out loss of the trained model, on the first batch's inputs
        losses.append(compute_loss(model(batches[0][0]), batches[0][1]).item())
    return losses, {k: v.detach().clone() for k, v in model.named_parameters()}


class GlobalBatches:
    """The test's global batches as a data set: sample `step * BATCH + i` is row i of batch `step`."""

    def __init__(self, batches):
        self.x = torch.cat([x for x, _ in batches])
        self.y = torch.cat([y for _, y in batches])

    def __len__(self) -> int:
        return len(self.x)

    def get(self, ids: torch.Tensor):
        return self.x[ids], self.y[ids]


def train_layout(cfg: Config, world: int, batches, spec=None, clip: float = 1.0, *, save: str = "",
                 resume: str = "", every_target_counts: bool = False):
    """Train `cfg`'s layout on this rank with the Trainer; returns (global losses, this rank's full
    params, pm, dims, mesh). `save`: a checkpoint folder written after SAVE_AT steps; `resume`: one
    to load first, then train on the batches after SAVE_AT (the losses returned are those steps').
    `every_target_counts`: the data promises no padding, as token windows do."""
    from shoal.data import ShardedSampler
    from shoal.runtime.checkpoint import Checkpointer
    from shoal.train import Placement, Trainer
    cfg.train.grad_clip = clip
    dims = check_layout(cfg, world)
    mesh = dims.build_mesh("cpu")
    pm = parallelize(build(cfg, spec), dims, mesh, cfg, torch.device("cpu"))
    dp_rank, dp_group = mesh["dp"].get_local_rank(), mesh["dp"].get_group()
    where = Placement(dp_rank=dp_rank, dp_size=dims.dp, rank=dist.get_rank(), device=torch.device("cpu"),
                      master=False)
    data = GlobalBatches(batches)
    data.every_target_counts = every_target_counts  # the data's promise that nothing is padding (shoal/train.py)
    trainer = Trainer(cfg, pm, data, data, placement=where, run_dir=Path(save or resume or "."))
    # the batches in order (with train.grad_accum, each in micro-batches)
    trainer.sampler = ShardedSampler(len(data), trainer.micro_batch, cfg.train.seed, shuffle=False)
    if resume:
        trainer.checkpointer = Checkpointer(Path(resume))
        trainer.resume(Path(resume) / f"step_{SAVE_AT:08d}")
    first, losses, grads = trainer.step, [], {}
    # the gradients as the optimizer meets them (train_step frees them after its step)
    def count_grads(*_) -> None:
        grads.setdefault("grads", state_bytes(pm.parameters())["grads"])
    hook = trainer.optimizer.register_step_pre_hook(count_grads)
    for step in range(first, len(batches)):
        if save and step == SAVE_AT:
            trainer.checkpointer = Checkpointer(Path(save))
            trainer.save()
        with SavedActivations(pm.model_parts) as saved:
            loss = trainer.train_step().loss.detach().clone()
        dist.all_reduce(loss, group=dp_group)
        losses.append(loss.item() / dims.dp)
        if step == len(batches) - 1:  # evaluate() after training: the reference's last entry
            pm.train(False)
            x, y = data.get(ShardedSampler(len(data), BATCH, 0, shuffle=False).next_batch(dp_rank, dims.dp))
            val = pm.evaluate(x, y).detach().clone()
            pm.train(True)
            dist.all_reduce(val, group=dp_group)
            losses.append(val.item() / dims.dp)
        if step == first:  # what shoal plan estimates: this rank's state and its activation peak
            pm.measured = {**state_bytes(pm.parameters(), trainer.optimizer), **grads, "activations": saved.peak}
    hook.remove()
    return losses, full_params(pm), pm, dims, mesh


def local_numel(pm) -> int:
    """Parameter elements this rank stores (its shards only)."""
    return sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in pm.parameters())


def full_params(pm) -> dict[str, torch.Tensor]:
    """This rank's parameters, reassembled from their shards (every rank must call it)."""
    out = {}
    for part in pm.model_parts:
        for name, p in part.named_parameters():
            out[name] = p.full_tensor().detach() if hasattr(p, "full_tensor") else p.detach()
    return out


def compare(losses, params, ref_losses, ref_params) -> dict:
    rel = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses))
    missing = [n for n in params if n not in ref_params]
    param_err = max((float((params[n] - ref_params[n]).abs().max()) for n in params if n in ref_params),
                    default=float("inf"))
    return {"loss_rel_err": rel, "param_max_err": param_err, "n_params": len(params), "missing": missing,
            "losses": losses, "ref_losses": ref_losses}


def run_layouts(rank: int, world: int, layouts: dict, out_dir: str, ckpt_root: str = "") -> None:
    """Train every named layout (a dict of parallel settings) and write this rank's comparison.
    A layout with "save": "x" writes checkpoint x; one with "resume": "x" starts from it."""
    results = {}
    for name, settings in layouts.items():
        settings = dict(settings)
        save, resume = (str(Path(ckpt_root, settings.pop(k))) if k in settings else "" for k in ("save", "resume"))
        if settings.pop("model", "gpt") == "dlrm":
            cfg, (batches, spec) = dlrm_config(**settings), click_batches()
        else:
            cfg, batches, spec = gpt_config(**settings), token_batches(), None
        try:
            ref_losses, ref_params = reference(cfg, batches, spec)
            losses, params, pm, *_ = train_layout(cfg, world, batches, spec, save=save, resume=resume)
            results[name] = compare(losses, params, ref_losses[SAVE_AT:] if resume else ref_losses, ref_params)
            results[name]["steps"] = len(losses) - 1
            results[name]["local_numel"] = local_numel(pm)
            results[name]["measured"] = pm.measured
            results[name]["full_numel"] = sum(p.numel() for p in ref_params.values())
        except Exception:  # recorded so the other layouts still run; the test for this one fails
            results[name] = {"error": traceback.format_exc()}
        dist.barrier()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


def merged(out_dir: str, world: int) -> dict[str, list[dict]]:
    per_rank = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world)]
    return {name: [r[name] for r in per_rank] for name in per_rank[0]}
