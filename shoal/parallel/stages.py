"""Which layers and stages each pipeline rank holds: plain arithmetic, apart from the schedules
themselves (shoal/parallel/pipeline.py), so that the launcher and `shoal plan` can check a layout
without importing `torch.distributed.pipelining` (about a second of start-up on every run)."""

from __future__ import annotations

STAGES_PER_RANK = {"gpipe": 1, "1f1b": 1, "interleaved_1f1b": 2}
"""Pipeline schedules by their `parallel.pp_schedule` name, and the stages each rank holds under them."""


def stage_layers(n_layers: int, n_stages: int) -> list[range]:
    """Layer indices of each stage, as even as the count allows; the remainder goes to the
    later stages because stage 0 also runs the embeddings."""
    base, extra = divmod(n_layers, n_stages)
    out, start = [], 0
    for s in range(n_stages):
        size = base + (1 if s >= n_stages - extra else 0)
        out.append(range(start, start + size))
        start += size
    return out


def stage_ids(pp_rank: int, pp: int, schedule: str) -> list[int]:
    """Stages this rank holds; interleaved schedules place stage s on rank s % pp (loop order)."""
    return [pp_rank + k * pp for k in range(STAGES_PER_RANK[schedule])]
