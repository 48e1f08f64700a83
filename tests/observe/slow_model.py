"""A model.factory with one slow rank: the mlp, whose forward sleeps SHOAL_TEST_SLOW_SECONDS
on the worker named by SHOAL_TEST_SLOW_RANK (its RANK, or under fault tolerance its launcher
slot SHOAL_FT_SLOT): a compute straggler, as a slow or throttled machine would be."""

import os
import time

import torch

from shoal.models.mlp import build_mlp
from shoal.runtime.protocol import SLOT_ENV


class Slow(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module, seconds: float):
        super().__init__()
        self.inner, self.seconds = inner, seconds

    def forward(self, x):
        if self.training:
            time.sleep(self.seconds)
        return self.inner(x)


def build(spec):
    model = build_mlp(spec.in_features, spec.num_classes, "debug")
    me = os.environ.get(SLOT_ENV, os.environ.get("RANK", "0"))
    if me == os.environ.get("SHOAL_TEST_SLOW_RANK"):
        return Slow(model, float(os.environ.get("SHOAL_TEST_SLOW_SECONDS", "0.05")))
    return model
