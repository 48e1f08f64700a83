"""DiLoCo, streaming DiLoCo and local SGD on 2 Gloo ranks."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from sync_helpers import params_equal_across_ranks, run_world
from shoal.config import SyncConfig
from shoal.sync import outer_sync_for
from shoal.sync.diloco import DiLoCo
from shoal.sync.local_sgd import LocalSGD
from shoal.sync.replica_state import make_replicas_equal

pytestmark = pytest.mark.distributed


def make_task(seed_data: int, steps: int, batch: int = 16) -> tuple[nn.Module, list]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))
    teacher = nn.Linear(16, 4)
    gen = torch.Generator().manual_seed(seed_data)
    data = []
    for _ in range(steps):
        x = torch.randn(batch, 16, generator=gen)
        data.append((x, teacher(x).detach()))
    return model, data


def diloco_matches_data_parallel_sgd(rank: int, world: int) -> None:
    # Every rank sees the global batch; its shard is rows rank::world.
    model, data = make_task(7, steps=6)
    single, _ = make_task(7, steps=0)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    plain = torch.optim.SGD(single.parameters(), lr=0.1)
    with torch.no_grad():  # a different start on rank 1: DiLoCo's entry broadcast must fix it
        for p in model.parameters():
            p.add_(rank)
    # Built from a [sync] section, the way the Trainer builds it.
    cfg = SyncConfig(method="diloco", inner_steps=1, outer_lr=1.0, outer_momentum=0.0, outer_warmup=0,
                     nesterov=False, compression="none")
    with outer_sync_for(cfg, model, inner, None) as diloco:
        assert isinstance(diloco, DiLoCo)
        for x, y in data:
            nn.functional.mse_loss(model(x[rank::world]), y[rank::world]).backward()
            inner.step()
            inner.zero_grad()
            nn.functional.mse_loss(single(x), y).backward()
            plain.step()
            plain.zero_grad()
            for p, q in zip(model.parameters(), single.parameters()):
                torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert diloco.outer_syncs == len(data)


VARIANTS = [  # compression, fragments, overlap
    ("none", 1, False), ("fp16", 1, False), ("bf16", 1, False), ("int8", 1, False), ("int4", 1, False),
    ("none", 3, False), ("int8", 2, True), ("fp4", 1, False), ("topk", 1, False), ("topk", 2, True),
]


def diloco_variants(rank: int, world: int) -> None:
    for compression, fragments, overlap in VARIANTS:
        name = f"{compression}/{fragments} fragments/overlap={overlap}"
        model, data = make_task(100 + rank, steps=48)
        inner = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        with DiLoCo(model, inner, inner_steps=6, outer_lr=0.7, outer_momentum=0.9, nesterov=True,
                    compression=compression, fragments=fragments, overlap=overlap,
                    topk_fraction=0.25) as diloco:  # topk: a quarter of this 1.7k-parameter model per sync
            assert params_equal_across_ranks(list(model.parameters())), name
            for step, (x, y) in enumerate(data, start=1):
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward()
                inner.step()
                inner.zero_grad()
                losses.append(loss.item())
                # With overlap a sync lands one step after it is due.
                synced = (diloco.due(step - 1) if step > 1 else []) if overlap else diloco.due(step)
                for index in range(fragments):
                    equal = params_equal_across_ranks(diloco.fragments[index].params)
                    if index in synced:
                        assert equal, f"{name}: fragment {index} differs right after its sync at step {step}"
                    elif step == 1:
                        assert not equal, f"{name}: replicas already equal after one local step"
        assert diloco.outer_syncs == len(data) // 6 * fragments, name
        first, last = sum(losses[:6]) / 6, sum(losses[-6:]) / 6
        assert last < 0.5 * first, f"{name}: loss {first:.3f} -> {last:.3f} did not fall"


def local_sgd_averages_every_h_steps(rank: int, world: int) -> None:
    model, data = make_task(100 + rank, steps=30)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    with outer_sync_for(SyncConfig(method="local_sgd", inner_steps=3), model, opt, None) as local:
        assert isinstance(local, LocalSGD)
        for step, (x, y) in enumerate(data, start=1):
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
            assert params_equal_across_ranks(list(model.parameters())) == (step % 3 == 0), step
    assert local.outer_syncs == 10
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])


def two_replicas(rank: int, world: int) -> None:
    # One world for the three: starting Gloo workers costs more than what they test on 2 cores.
    diloco_matches_data_parallel_sgd(rank, world)
    diloco_variants(rank, world)
    local_sgd_averages_every_h_steps(rank, world)


def test_diloco_is_data_parallel_sgd_its_variants_train_and_local_sgd_averages():
    """DiLoCo(H=1, SGD, outer lr 1, no momentum) == data-parallel SGD; every compression and
    streaming variant trains and leaves replicas equal after each sync; local SGD averages every H."""
    run_world(two_replicas, 2)


def diloco_across_fsdp_replicas(rank: int, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    # Hierarchical: 2 replicas (the slow axis) of 2 FSDP shards each (the fast axis).
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_replicate", "dp_shard"))
    model, data = make_task(100 + rank, steps=12)
    fully_shard(model, mesh=mesh["dp_shard"])
    inner = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    with DiLoCo(model, inner, group=mesh["dp_replicate"].get_group(), inner_steps=3,
                compression="int8") as diloco:
        for step, (x, y) in enumerate(data, start=1):
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            inner.step()
            inner.zero_grad()
            losses.append(loss.item())
            full = [p.full_tensor() for p in model.parameters()]  # the whole model, as one replica holds it
            assert params_equal_across_ranks(full) == (step % 3 == 0), f"step {step}"
            if step == 7:  # between syncs: each replica's own shards and AdamW moments are in the state
                buffer = io.BytesIO()
                torch.save(diloco.state_dict(), buffer)
        assert diloco.outer_syncs == 4
        assert sum(losses[-3:]) < sum(losses[:3])
        buffer.seek(0)
        diloco.load_state_dict(torch.load(buffer, weights_only=True))  # as a resumed run does
        for step, (x, y) in enumerate(data[7:], start=8):
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            inner.step()
            inner.zero_grad()
            assert loss.item() == losses[step - 1], f"step {step} after loading the step-7 state"


def test_diloco_across_replicas_of_fsdp_shards():
    run_world(diloco_across_fsdp_replicas, 4)


def three_replicas_int8(rank: int, world: int) -> None:
    from shoal.sync.compress import quantized_all_reduce, quantized_reduce_scatter
    # The two-step average itself: bit-identical everywhere, within two roundings of the true mean.
    for bits, numel in ((8, 1000), (4, 3 * 256 + 5), (8, 1)):
        x = torch.randn(numel, generator=torch.Generator().manual_seed(rank * 7 + numel)) * (rank + 1)
        everyone = [torch.empty_like(x) for _ in range(world)]
        torch.distributed.all_gather(everyone, x)
        true = torch.stack(everyone).mean(0)
        got = quantized_reduce_scatter(x, bits)
        assert params_equal_across_ranks([got])
        step = max(e.abs().max() for e in everyone) / {8: 127, 4: 7}[bits]
        assert (got - true).abs().max() <= step, (bits, numel)
        assert not torch.equal(got, quantized_all_reduce(x, bits).wait()) or numel == 1  # the other path
    # DiLoCo on 3 replicas without overlap takes that path and leaves the replicas equal after each sync.
    model, data = make_task(200 + rank, steps=8)
    inner = torch.optim.AdamW(model.parameters(), lr=3e-3)
    with DiLoCo(model, inner, inner_steps=4, compression="int8") as diloco:
        for step, (x, y) in enumerate(data, start=1):
            nn.functional.mse_loss(model(x), y).backward()
            inner.step()
            inner.zero_grad()
            assert params_equal_across_ranks(list(model.parameters())) == (step % 4 == 0), step
    assert diloco.outer_syncs == 2
    # Entry sends the model only where the replicas differ: equal now, so nothing travels...
    params = [p.detach() for p in model.parameters()]
    assert not make_replicas_equal(params, torch.distributed.group.WORLD)
    with torch.no_grad():
        params[0].add_(rank == 2)
    # ...and after one replica drifted, everyone takes rank 0's values.
    assert make_replicas_equal(params, torch.distributed.group.WORLD)
    assert params_equal_across_ranks(params)


def test_int8_diloco_on_three_replicas_averages_in_two_steps():
    run_world(three_replicas_int8, 3)
