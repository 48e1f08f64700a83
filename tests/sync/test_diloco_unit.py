"""DiLoCo in one process (a one-rank group): fragments, the outer step, and exact resume."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from shoal.sync.diloco import DiLoCo, split_fragments


def test_split_fragments_are_contiguous_and_balanced():
    params = [nn.Parameter(torch.zeros(n)) for n in [100, 1, 1, 100, 1, 1, 100, 1, 1, 100]]
    assert split_fragments(params, 1) == [list(range(10))]
    runs = split_fragments(params, 4)
    assert [i for run in runs for i in run] == list(range(10))
    assert all(90 <= sum(params[i].numel() for i in run) <= 110 for run in runs)
    assert split_fragments(params, 10) == [[i] for i in range(10)]
    with pytest.raises(ValueError, match="fragments"):
        split_fragments(params, 11)


def test_outer_nesterov_step_on_one_rank(single_rank_group):
    # One rank: the average is the rank's own pseudo-gradient, so the result is checkable by hand.
    model = nn.Linear(1, 1, bias=False)
    nn.init.constant_(model.weight, 1.0)
    inner = torch.optim.SGD(model.parameters(), lr=1.0)
    with DiLoCo(model, inner, inner_steps=2, outer_lr=0.5, outer_momentum=0.9, nesterov=True) as diloco:
        for _ in range(2):
            model.weight.grad = torch.ones(1, 1)
            inner.step()
        # pseudo-gradient 1 - (-1) = 2; Nesterov: buf = 2, step = 2 + 0.9 * 2 = 3.8; 1 - 0.5 * 3.8
        assert model.weight.item() == pytest.approx(1 - 0.5 * 3.8)
        assert diloco.outer_syncs == 1


def _train(model, inner, diloco, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 4, generator=gen)
        nn.functional.mse_loss(model(x), x.sum(1, keepdim=True)).backward()
        inner.step()
        inner.zero_grad()


@pytest.mark.parametrize("overlap,compression", [(False, "int8"), (True, "int8"), (True, "topk"), (False, "fp4")])
def test_resume_from_state_dict_is_exact(single_rank_group, overlap, compression):
    # topk: the error-feedback residual is part of the state, or the resumed run would send other values.
    def fresh():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

    options = dict(inner_steps=4, fragments=2, overlap=overlap, compression=compression)
    model, inner = fresh()
    with DiLoCo(model, inner, **options) as diloco:
        _train(model, inner, diloco, 6, seed=1)
        _train(model, inner, diloco, 6, seed=2)
    straight = [p.detach().clone() for p in model.parameters()]

    model, inner = fresh()
    with DiLoCo(model, inner, **options) as diloco:
        _train(model, inner, diloco, 6, seed=1)  # step 6: a fragment's average is in flight with overlap
        buffer = io.BytesIO()
        torch.save({"model": model.state_dict(), "inner": inner.state_dict(), "diloco": diloco.state_dict()},
                   buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model, inner = fresh()
    model.load_state_dict(saved["model"])
    inner.load_state_dict(saved["inner"])
    with DiLoCo(model, inner, **options) as diloco:
        diloco.load_state_dict(saved["diloco"])
        _train(model, inner, diloco, 6, seed=2)
    for p, q in zip(model.parameters(), straight):
        assert torch.equal(p, q)


@pytest.mark.parametrize("method", ["diloco", "local_sgd"])
def test_the_outer_sync_state_alone_restores_the_replica(single_rank_group, method):
    # What a checkpoint's DCP part cannot hold (each replica's own weights and AdamW moments between
    # syncs) is in the state: loaded into a fresh model and optimizer, the run goes on exactly.
    from shoal.sync.local_sgd import LocalSGD

    def fresh(seed):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
        sync = DiLoCo(model, inner, inner_steps=4) if method == "diloco" else LocalSGD(model, inner, inner_steps=4)
        return model, inner, sync

    model, inner, sync = fresh(0)
    with sync:
        _train(model, inner, sync, 6, seed=1)  # between syncs
        buffer = io.BytesIO()
        torch.save(sync.state_dict(), buffer)
        _train(model, inner, sync, 6, seed=2)
    straight = [p.detach().clone() for p in model.parameters()]
    buffer.seek(0)
    model, inner, sync = fresh(1)  # other weights, no optimizer state yet
    with sync:
        sync.load_state_dict(torch.load(buffer, weights_only=True))
        _train(model, inner, sync, 6, seed=2)
    assert (sync.outer_syncs, sync.inner_step) == (3, 12)
    for p, q in zip(model.parameters(), straight):
        assert torch.equal(p, q)
