"""Fixtures of the sync tests."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from shoal.runtime import before_init  # noqa: F401  (before any init_process_group)
from tests.conftest import free_port


@pytest.fixture
def single_rank_group():
    """A one-rank Gloo group in this process, for unit tests of the collectives' arithmetic."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()

