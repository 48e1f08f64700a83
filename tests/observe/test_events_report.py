"""One process, no workers: the event record's shape, the straggler rule and `shoal report` on
a metrics.jsonl holding events, per-rank windows and a federated run's rounds."""

from __future__ import annotations

import json

import pytest

from shoal.observe.events import append_event, event_record
from shoal.observe.ranks import RankTiming
from shoal.observe.report import event_step, smooth, write_report


def test_event_records_share_one_shape_and_unknown_names_are_refused(tmp_path):
    record = append_event(tmp_path / "metrics.jsonl", "died", 7, member=2, signal="SIGKILL")
    assert list(record)[:4] == ["time", "kind", "event", "step"] and record["kind"] == "event"
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == record
    with pytest.raises(ValueError, match="unknown event 'crashed'"):
        event_record("crashed", 1)


def window(compute: list[float]):
    """A gather as two ranks would answer it: each rank's [data, compute, arrival]."""
    return lambda _, __: ([str(r) for r in range(len(compute))], [[0.001, c, c + 0.001] for c in compute])


def test_a_rank_is_named_a_straggler_after_three_slow_windows_and_once():
    timing = RankTiming(5, window([0.010, 0.010]))
    named = []
    for step, compute in enumerate([[0.010, 0.010], [0.010, 0.030], [0.010, 0.030], [0.010, 0.030],
                                    [0.010, 0.030], [0.010, 0.010], [0.030, 0.010], [0.030, 0.010],
                                    [0.030, 0.010]], start=1):
        timing.gather = window(compute)
        for _ in range(5):
            timing.add(data=0.001, compute=0.01, arrival=0.011)
        record = timing.summary(step * 5)
        assert record["slowest_rank"] == ("1" if compute[1] > compute[0] else "0" if compute[0] > compute[1]
                                          else record["slowest_rank"])
        if (found := timing.straggler(record)) is not None:
            named.append((step * 5, found[0], round(found[1], 2)))
    assert named == [(20, "1", 2.0), (45, "0", 2.0)]  # 3 windows in a row, once, again after recovering


def test_report_draws_and_lists_events(tmp_path):
    records = [{"kind": "train", "step": s, "loss": 3.0 / s, "time": 100.0 + s, "step_seconds": 0.1,
                "comm_seconds": 0.02, "data_seconds": 0.01, "compute_seconds": 0.05, "arrival_seconds": 0.06,
                "tokens_per_second": 5000.0, "world_size": 3 if s < 20 or s > 30 else 2} for s in range(1, 51)]
    records += [{"kind": "eval", "step": s, "val_loss": 3.5 / s, "time": 100.0 + s} for s in (25, 50)]
    records += [{"kind": "ranks", "step": s, "steps": 5, "ranks": 2, "compute_min": 0.01, "compute_median": 0.02,
                 "compute_max": 0.03, "slowest_rank": "1", "slowest_by": 2.0, "others_compute_median": 0.01,
                 "per_rank": {"rank": ["0", "1"], "data": [0.0, 0.0], "compute": [0.01, 0.03],
                              "arrival": [0.011, 0.031]}} for s in range(5, 51, 5)]
    records += [event_record("died", 18, time=120.5, member=1, signal="SIGKILL"),
                event_record("replaced", 18, time=120.6, member=1, delay=0.0),
                event_record("regrouped", 18, time=120.63, gen=2, members=[0, 2], size=2, recovery_seconds=0.13),
                event_record("left", 18, time=120.63, member=1, gen=2),
                event_record("died", 40, time=140.5, member=2, code=1),
                event_record("regrouped", 40, time=141.0, gen=3, members=[0, 3], size=2, recovery_seconds=0.5),
                event_record("straggler", 15, time=115.0, rank="1", slower=2.0, compute_seconds=0.03,
                             others_compute_seconds=0.01),
                event_record("checkpoint", 25, time=125.0, seconds=0.02)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary, png = write_report(tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "2 workers lost (1 SIGKILL, 1 exit code 1), 1 replaced, median recovery 0.32 s (max 0.50 s)" in text
    assert "world size 2 -> 2" in text and "1 checkpoints written" in text and "slowest rank: 1" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # an event sits between the steps that ended around its time (the launcher's step lags)
    assert event_step(records[-8], [r for r in records if r["kind"] == "train"]) == pytest.approx(20.5)


def test_smoothing_follows_the_curve_without_pulling_toward_zero():
    assert smooth([5.0, 5.0, 5.0]) == pytest.approx([5.0, 5.0, 5.0])
    assert smooth(list(range(100)))[-1] > 80


def test_federated_report_shows_rounds_and_the_site_spread(tmp_path):
    rows = [{"time": 1.0 + r, "round": r, "sampled": 4, "answered": 4, "train_loss": 1.0 / r,
             "eval_accuracy": 0.5 + r / 40, "eval_loss": 1.2 / r, "eval_accuracy_median": 0.5 + r / 40,
             "eval_accuracy_min": 0.3 + r / 40, "eval_accuracy_max": 0.7 + r / 40, "seconds": 0.5} for r in range(1, 11)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary, png = write_report(tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "rounds: 10" in text and "final accuracy: 0.7500 (sites 0.5500 to 0.9500, median 0.7500)" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
