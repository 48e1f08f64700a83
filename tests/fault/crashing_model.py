"""A model.factory whose replacements crash at start (a bad node image, say): the first workers of
a job build an mlp; a restarted one raises before it can commit a step (only in slot
SHOAL_TEST_CRASH_SLOT when that is set)."""

import os

from shoal.models.mlp import build_mlp
from shoal.runtime.protocol import INCARNATION_ENV, SLOT_ENV


def build(spec):
    restarted = os.environ.get(INCARNATION_ENV, "0") != "0"
    slot = os.environ.get("SHOAL_TEST_CRASH_SLOT")
    if restarted and (slot is None or os.environ.get(SLOT_ENV) == slot):
        raise RuntimeError("this replacement cannot start (a crash before its first step)")
    return build_mlp(spec.in_features, spec.num_classes, "debug")
