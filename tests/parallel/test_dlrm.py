"""DLRM on the generated click log learns what the teacher knows (one process)."""

from __future__ import annotations

import torch

from shoal.config import Config
from shoal.data.clicks import auc, build_clicks
from shoal.models import build_model, compute_loss


def test_auc_counts_ordered_pairs():
    labels = torch.tensor([0, 0, 1, 1])
    assert auc(torch.tensor([0.1, 0.2, 0.3, 0.4]), labels) == 1.0
    assert auc(torch.tensor([0.4, 0.3, 0.2, 0.1]), labels) == 0.0
    assert auc(torch.tensor([0.5, 0.5, 0.5, 0.5]), labels) == 0.5  # ties count half


def test_clicks_are_reproducible_and_follow_the_teacher():
    cfg = Config().data
    cfg.source, cfg.num_samples, cfg.val_fraction = "clicks", 4000, 0.25
    train, val, spec = build_clicks(cfg, seed=3)
    again, _, _ = build_clicks(cfg, seed=3)
    ids = torch.arange(10)
    assert torch.equal(train.get(ids)[0], again.get(ids)[0])
    assert (len(train), len(val)) == (3000, 1000)
    assert spec.table_sizes and spec.in_features == spec.dense_features + len(spec.table_sizes)
    log = train.base
    assert log.bayes_auc() > 0.8  # the teacher's own probabilities separate clicks well


def test_dlrm_learns_the_click_rule():
    cfg = Config()
    cfg.model.name, cfg.data.source, cfg.data.num_samples, cfg.data.val_fraction = "dlrm", "clicks", 12000, 0.2
    train, val, spec = build_clicks(cfg.data, seed=0)
    torch.manual_seed(0)
    model = build_model(cfg.model, spec)
    x_val, y_val = val.get(torch.arange(len(val)))
    with torch.no_grad():
        before = auc(model(x_val).softmax(-1)[:, 1], y_val)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    for _ in range(150):
        x, y = train.get(torch.randint(0, len(train), (128,), generator=g))
        loss = compute_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = auc(model(x_val).softmax(-1)[:, 1], y_val)
    best = train.base.bayes_auc(len(train), None)
    assert abs(before - 0.5) < 0.1  # untrained: a coin
    assert after > 0.72 and after < best + 0.01, (before, after, best)
