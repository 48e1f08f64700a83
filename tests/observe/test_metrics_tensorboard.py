"""What MetricsLog writes to TensorBoard, read back with TensorBoard's own reader: every number of
a sampled record under `kind/field` at the record's step, events as text, unsampled steps absent."""

from __future__ import annotations

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from shoal.observe.metrics import MetricsLog


def test_every_number_of_a_sampled_record_is_a_scalar_at_its_step(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=True, tensorboard_every=10)
    for step in range(1, 21):
        log.log({"kind": "train", "step": step, "loss": 1.0 / step, "lr": 1e-3, "samples": 32 * step,
                 "world_size": 2, "name": "not a number"})
    log.log({"kind": "ranks", "step": 20, "compute_max": 0.25, "slowest_rank": "1", "slowest_by": 0.5})
    log.log({"kind": "event", "event": "died", "step": 20, "code": -9})
    log.close()

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert sorted(tags["scalars"]) == ["ranks/compute_max", "ranks/slowest_by", "train/loss", "train/lr",
                                       "train/samples", "train/world_size"]
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [10, 20]  # sampled every 10 steps
    assert [round(e.value, 6) for e in loss] == [0.1, 0.05]
    assert [e.value for e in events.Scalars("train/samples")] == [320, 640]
    assert [(e.step, e.value) for e in events.Scalars("ranks/slowest_by")] == [(20, 0.5)]
    assert "events" in " ".join(tags["tensors"])  # the event as text
