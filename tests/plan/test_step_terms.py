"""Each calibrated term of the step-time model on this host (shoal/plan/steptime.py with
hardware.LocalHost) moves the prediction the way its cause does: one process, a synthetic
calibration (no workers started, nothing measured), so each test isolates one quantity."""

from __future__ import annotations

import json

import pytest
import torch

from shoal.config import Config
from shoal.parallel.compose import check_layout
from shoal.plan.calibrate import CALIBRATION_VERSION, DRIFT, Calibration, drift_warning, load_calibration, \
    save_calibration, speed_drift, stale_calibration
from shoal.plan.collectives import OPS
from shoal.plan.hardware import LocalHost
from shoal.plan.layouts import with_degrees
from shoal.plan.memory import meta_model
from shoal.plan.profile import profile_key
from shoal.plan.steptime import block_shape, predict_step

WORLD = 2


def gpt() -> Config:
    cfg = Config()
    cfg.model.name, cfg.model.flavour, cfg.model.dim, cfg.model.n_layers = "gpt", "debug", 64, 2
    cfg.data.seq_len, cfg.train.batch_size = 32, 16
    cfg.parallel.dp_replicate, cfg.parallel.pp_microbatches = 1, 4
    return cfg


def calibration(cfg: Config, layouts: list[dict], world: int = WORLD, **changed) -> Calibration:
    """A calibration of a made-up 2-core host, with the block profiles `layouts` need."""
    per_world = {str(w): v for w, v in ((2, 1.0), (4, 2.0))}
    cal = Calibration(
        host="test", torch_version=torch.__version__, threads=2, cores=2, version=CALIBRATION_VERSION,
        op_overhead={"1": 1e-5, "2": 1e-5}, bandwidth={"1": 1e10, "2": 1e10},
        collectives={w: {op: [1e-4 * f, 1e9 / f] for op in OPS} for w, f in per_world.items()},
        dtensor_op={w: 2e-5 * f for w, f in per_world.items()}, tp_linear={w: 1e-4 * f for w, f in per_world.items()},
        tp_dtensor_op={w: 2e-5 * f for w, f in per_world.items()}, fsdp_param={w: 1e-5 * f for w, f in per_world.items()},
        fsdp_unit={w: 1e-4 * f for w, f in per_world.items()}, fsdp_nosync={w: [0.25, 0.5] for w in per_world},
        fsdp_byte={w: 1e-10 * f for w, f in per_world.items()},
        concurrent={w: [1e-5 * f, 1e10 / f] for w, f in per_world.items()},
        optimizer_op={w: 3e-6 * f for w, f in per_world.items()},
        ddp_step={w: [1e-4 * f, 1e-6 * f, 1e-10 * f] for w, f in per_world.items()},
        pp_slot={w: 3e-4 * f for w, f in per_world.items()},
        hook_element={f"{m}:{w}": 1e-9 for m in ("fp16", "bf16", "int8", "int4") for w in per_world})
    for degrees in layouts:
        layout = with_degrees(cfg, degrees)
        cal.blocks[profile_key(cfg, *block_shape(layout, check_layout(layout, world), meta_model(cfg)), world)] = [2e-3, 1e-3, 5e-5]
    for name, value in changed.items():
        setattr(cal, name, value)
    return cal


def step(cfg: Config, degrees: dict, cal: Calibration, method: str = "allreduce", world: int = WORLD):
    layout = with_degrees(cfg, degrees)
    layout.sync.method = method
    return predict_step(layout, check_layout(layout, world), meta_model(cfg), LocalHost(cal, world))


def test_compressed_hook_arithmetic_is_priced_per_element():
    """int8's quantise/dequantise is timed per gradient element: a slower one makes the step slower,
    by the model's gradient elements times the difference."""
    cfg = gpt()
    ddp = {"dp_replicate": 2}
    cheap = step(cfg, ddp, calibration(cfg, [ddp]), "int8")
    slow_cal = calibration(cfg, [ddp])
    slow_cal.hook_element = {key: 1e-7 for key in slow_cal.hook_element}
    slow = step(cfg, ddp, slow_cal, "int8")
    elements = sum(p.numel() for p in meta_model(cfg).parameters())
    assert slow.compute - cheap.compute == pytest.approx(elements * (1e-7 - 1e-9), rel=0.02)
    assert step(cfg, ddp, slow_cal).compute == step(cfg, ddp, calibration(cfg, [ddp])).compute  # no hook, no cost


def test_a_host_slower_or_faster_than_its_calibration_is_warned_about():
    """`shoal plan` times the operator overhead again against the cached one: a host that moved by
    more than DRIFT is told so (the calibration is a snapshot of one moment's speed)."""
    cal = calibration(gpt(), [], calibrated_at="2026-12-05 20:10 UTC")
    cal.op_overhead = {"2": 1e-12}  # a picosecond an operator: every host is slower than that
    slower = speed_drift(cal)
    assert slower > 1 + DRIFT
    warning = drift_warning(cal, slower)
    assert "slower now than when it was calibrated (2026-12-05 20:10 UTC)" in warning
    assert "shoal plan --calibrate" in warning
    cal.op_overhead = {"2": 1.0}  # a second an operator: every host is faster than that
    assert "faster now" in drift_warning(cal, speed_drift(cal))
    assert drift_warning(cal, 1.2) is None and drift_warning(cal, 0.6) is None  # within the probe's noise
    assert "1.3x slower" in drift_warning(cal, 1.3) and "2.5x faster" in drift_warning(cal, 0.4)


def test_a_cache_of_an_older_format_is_not_used(tmp_path):
    cfg = gpt()
    path = tmp_path / "calibration.json"
    save_calibration(calibration(cfg, []), path)
    assert load_calibration(path) is not None and stale_calibration(path) is None
    old = json.loads(path.read_text())
    old.pop("version")
    old.pop("hook_element")
    path.write_text(json.dumps(old))
    assert load_calibration(path) is None
    assert f"format 1, this Shoal reads format {CALIBRATION_VERSION}" in stale_calibration(path)


def test_tensor_parallel_optimizer_grows_with_its_profiled_dtensor_cost():
    """Clipping and the optimizer on tensor-parallel parameters are priced per operator at the cost
    profiled on the stage's own TP parameters (the whole step, nothing priced beside it): raising
    it slows the TP step in proportion and leaves FSDP's alone."""
    cfg = gpt()
    tp, fsdp = {"tp": 2}, {"dp_shard": 2}
    base, costly = calibration(cfg, [tp, fsdp]), calibration(cfg, [tp, fsdp])
    layout = with_degrees(cfg, tp)
    key = profile_key(cfg, *block_shape(layout, check_layout(layout, WORLD), meta_model(cfg)), WORLD)
    costly.blocks[key] = [2e-3, 1e-3, 5e-4]
    ops = step(cfg, tp, costly).optimizer - step(cfg, tp, base).optimizer
    assert ops > 100 * (5e-4 - 5e-5)  # a few hundred AdamW and clipping operators
    assert step(cfg, tp, costly).optimizer == pytest.approx(10 * step(cfg, tp, base).optimizer)
    assert step(cfg, fsdp, costly).optimizer == step(cfg, fsdp, base).optimizer


def test_fsdp_step_grows_with_its_cost_per_module_and_per_parameter_tensor():
    """FSDP2's own work is added once per forward+backward for every fully_shard'ed module (the
    blocks and the root) and every parameter tensor of the rank; DDP pays neither."""
    cfg = gpt()
    fsdp, ddp = {"dp_shard": 2}, {"dp_replicate": 2}
    base = calibration(cfg, [fsdp, ddp])
    per_tensor = calibration(cfg, [fsdp, ddp], fsdp_param={"2": 1e-3, "4": 2e-3})
    per_unit = calibration(cfg, [fsdp, ddp], fsdp_unit={"2": 1e-2, "4": 2e-2})
    tensors = sum(1 for _ in meta_model(cfg).parameters())
    assert step(cfg, fsdp, per_tensor).compute - step(cfg, fsdp, base).compute == pytest.approx(
        tensors * (1e-3 - 1e-5))
    units = cfg.model.n_layers + 1
    assert step(cfg, fsdp, per_unit).compute - step(cfg, fsdp, base).compute == pytest.approx(units * (1e-2 - 1e-4))
    assert step(cfg, ddp, per_tensor).compute == step(cfg, ddp, per_unit).compute == step(cfg, ddp, base).compute


def test_workers_beyond_the_cores_stretch_compute():
    """4 workers on 2 cores: the cost per operator and the bandwidth, timed with one worker per
    core, run world/cores = 2x slower through a step; on 4 cores they do not."""
    from shoal.plan.opcount import OpCount
    cfg = gpt()
    work = OpCount(0.0, {}, 1000, 1e8)
    cal = calibration(cfg, [], concurrent={"2": [1e-5, 1e10], "4": [1.5e-5, 8e9]})
    two_cores = LocalHost(cal, 4).compute_seconds(work)
    assert two_cores == pytest.approx(2 * (1000 * 1e-5 + 1e8 / 1e10))  # 2 workers' costs, taking turns
    cal.cores = 4
    four_cores = LocalHost(cal, 4).compute_seconds(work)
    assert four_cores == pytest.approx(1000 * 1.5e-5 + 1e8 / 8e9)  # the 4-worker calibration, as measured


def test_the_optimizer_is_priced_at_its_own_cost_per_operator():
    """Optimizer operators run without autograd: they are priced at the calibrated optimizer_op,
    not at the forward+backward's cost per operator."""
    cfg = gpt()
    ddp = {"dp_replicate": 2}
    cheap = calibration(cfg, [ddp], optimizer_op={"2": 1e-6, "4": 1e-6})
    costly = calibration(cfg, [ddp], optimizer_op={"2": 1e-4, "4": 1e-4})
    ops = (step(cfg, ddp, costly).optimizer - step(cfg, ddp, cheap).optimizer) / (1e-4 - 1e-6)
    assert 300 < ops < 1000  # AdamW's operators over the debug GPT's parameters, and clipping's
    assert step(cfg, ddp, costly).compute == step(cfg, ddp, cheap).compute


def test_ddp_step_grows_with_its_own_work_per_step_per_tensor_and_per_byte():
    """DDP's own work (forward bookkeeping, a hook per gradient, bucket copies) is added to each
    forward+backward: per step, per parameter tensor and per gradient byte; FSDP does not pay it."""
    cfg = gpt()
    ddp, fsdp = {"dp_replicate": 2}, {"dp_shard": 2}
    base = calibration(cfg, [ddp, fsdp])
    costly = calibration(cfg, [ddp, fsdp], ddp_step={"2": [5e-3, 1e-4, 1e-10], "4": [5e-3, 1e-4, 1e-10]})
    per_byte = calibration(cfg, [ddp, fsdp], ddp_step={"2": [1e-4, 1e-6, 1e-8], "4": [1e-4, 1e-6, 1e-8]})
    params = list(meta_model(cfg).parameters())
    tensors, grad_bytes = len(params), sum(p.numel() for p in params) * 4
    assert step(cfg, ddp, costly).compute - step(cfg, ddp, base).compute == pytest.approx(
        (5e-3 - 1e-4) + tensors * (1e-4 - 1e-6))
    assert step(cfg, ddp, per_byte).compute - step(cfg, ddp, base).compute == pytest.approx(
        grad_bytes * (1e-8 - 1e-10))
    assert step(cfg, fsdp, costly).compute == step(cfg, fsdp, base).compute


def test_fsdp_work_under_a_pipeline_is_paid_every_micro_batch():
    """pp 2 x dp 2 replicates each stage through FSDP2 on groups of 2: its work per module is
    paid on every micro-batch (its hooks run on each stage call), for the stage's share, at the
    2-rank group's calibrated cost, stretched by the 4 workers sharing 2 cores; in full on the
    last micro-batch, which reduces the gradients, and at the calibrated fraction of a pass
    without gradient sync on the others (torch's pipeline stages keep the parameters unsharded)."""
    cfg = gpt()
    pipeline = {"pp": 2, "dp_replicate": 2}
    base = calibration(cfg, [pipeline], world=4)
    costly = calibration(cfg, [pipeline], world=4, fsdp_unit={"2": 1e-4 + 1e-2, "4": 5.0})
    units = cfg.model.n_layers // 2 + 1  # this stage's blocks and the root
    m = cfg.parallel.pp_microbatches
    extra = step(cfg, pipeline, costly, world=4).compute - step(cfg, pipeline, base, world=4).compute
    assert extra == pytest.approx((1 + (m - 1) * 0.25) * units * 1e-2 * 2)
    cheaper = calibration(cfg, [pipeline], world=4, fsdp_unit={"2": 1e-4 + 1e-2, "4": 5.0},
                          fsdp_nosync={"2": [0.1, 0.5], "4": [0.9, 0.9]})
    full_pass = LocalHost(cheaper, 4).fsdp_seconds(units, sum(1 for _ in meta_model(cfg).parameters()) / 2, group=2)
    assert step(cfg, pipeline, costly, world=4).compute - step(cfg, pipeline, cheaper, world=4).compute == \
        pytest.approx((m - 1) * (0.25 - 0.1) * full_pass, rel=1e-6)


def test_fsdp_accumulation_reduces_once_a_step():
    """Gradient accumulation under FSDP (ParallelModel.no_sync) reduce-scatters after the last
    micro-step only: the earlier micro-steps pay the accumulation fraction of FSDP2's own work and
    their gathers, but no reduce-scatter."""
    cfg = gpt()
    fsdp = {"dp_shard": 2}
    one = step(cfg, fsdp, calibration(cfg, [fsdp]))
    cfg.train.grad_accum, cfg.train.batch_size = 2, 32  # the same micro-batch, twice
    costly = calibration(cfg, [fsdp], fsdp_unit={"2": 1e-4 + 1e-2, "4": 2e-2})
    base = calibration(cfg, [fsdp])
    units = cfg.model.n_layers + 1
    assert step(cfg, fsdp, costly).compute - step(cfg, fsdp, base).compute == pytest.approx((1 + 0.5) * units * 1e-2)
    two = step(cfg, fsdp, base)
    ag = LocalHost(base, WORLD).collective("all_gather", 2)
    # a whole unit's bytes (predict_step without the memory estimate's per-rank bytes takes the model's as one shard's)
    unit_bytes = 2 * sum(p.numel() for p in meta_model(cfg).parameters()) * 4 / units
    gathers = units + units - 2
    assert two.comm - one.comm == pytest.approx(gathers * ag.seconds(unit_bytes), rel=1e-6)  # no second reduce-scatter
