"""A run resumed from the checkpoint of step S: metrics.jsonl keeps what came before S and the
events, and loses the killed attempt's records of later steps (each step appears once)."""

from __future__ import annotations

import json

from shoal.observe.metrics import drop_records_after, read_metrics


def test_records_after_the_checkpoint_are_dropped_and_events_kept(tmp_path):
    records = [{"kind": "train", "step": s, "loss": 1.0 / s} for s in range(1, 8)]
    records += [{"kind": "eval", "step": 6, "val_loss": 0.5}, {"kind": "ranks", "step": 7, "compute_max": 0.1},
                {"kind": "event", "event": "died", "step": 7, "code": -9}]
    text = "".join(json.dumps(r) + "\n" for r in records) + '{"kind": "train", "st'  # cut by the kill
    (tmp_path / "metrics.jsonl").write_text(text)
    assert drop_records_after(tmp_path, 5) == 5  # steps 6 and 7, the eval of 6, the ranks of 7, the cut line
    kept = read_metrics(tmp_path)
    assert [r["step"] for r in kept if r["kind"] == "train"] == [1, 2, 3, 4, 5]
    assert [r["event"] for r in kept if r["kind"] == "event"] == ["died"]
    assert drop_records_after(tmp_path, 5) == 0 and read_metrics(tmp_path) == kept
    assert drop_records_after(tmp_path / "none", 5) == 0  # no metrics yet: nothing to do
