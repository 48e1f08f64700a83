"""Activation checkpointing keeps fewer activations and gives the same gradients (one process)."""

from __future__ import annotations

import torch

from torch.utils.flop_counter import FlopCounterMode

from shoal.config import Config
from shoal.data.spec import DataSpec
from shoal.models import build_model, compute_loss
from shoal.parallel.activation import apply_ac
from shoal.plan.measure import SavedActivations


def _run(mode: str):
    cfg = Config()
    cfg.model.dim, cfg.model.n_layers, cfg.parallel.activation_checkpointing = 64, 4, mode
    torch.manual_seed(0)
    model = apply_ac(build_model(cfg.model, DataSpec(kind="tokens", vocab_size=64, seq_len=32)), mode, [])
    tokens = torch.randint(0, 64, (4, 33), generator=torch.Generator().manual_seed(1))
    with SavedActivations([model]) as saved:
        loss = compute_loss(model(tokens[:, :-1]), tokens[:, 1:])
    with FlopCounterMode(display=False) as backward_flops:
        loss.backward()
    return (saved.peak, {n: p.grad for n, p in model.named_parameters()}, dict(model.named_parameters()),
            backward_flops.get_total_flops())


def test_checkpointing_saves_less_and_keeps_gradients_and_names():
    none_peak, none_grads, none_params, _ = _run("none")
    for mode in ("selective", "full"):
        peak, grads, params, _ = _run(mode)
        assert list(params) == list(none_params)  # checkpoints stay loadable either way
        for name, g in grads.items():
            torch.testing.assert_close(g, none_grads[name], rtol=1e-5, atol=1e-6)
        assert peak < 0.6 * none_peak, (mode, peak, none_peak)


def test_selective_keeps_the_matmuls_and_full_recomputes_them():
    none_flops, selective_flops, full_flops = (_run(mode)[3] for mode in ("none", "selective", "full"))
    assert selective_flops == none_flops  # only cheap element-wise ops are redone
    assert full_flops > 1.3 * none_flops  # the blocks' matmuls run again in backward
