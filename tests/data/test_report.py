"""`shoal report` shows the time a step waits for data beside communication and compute."""

import json

from shoal.observe.report import write_report


def test_report_splits_each_step_into_data_communication_and_compute(tmp_path):
    records = [{"kind": "train", "step": s, "loss": 2.0 - s / 10, "time": 100.0 + s, "step_seconds": 0.100,
                "comm_seconds": 0.020, "data_seconds": 0.030, "samples_per_second": 320.0} for s in range(1, 11)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary, png = write_report(tmp_path)
    assert abs(summary["data_seconds"] - 0.030) < 1e-9 and abs(summary["compute_seconds"] - 0.050) < 1e-9
    text = (tmp_path / "report.md").read_text()
    assert "waiting for data 30.0 ms" in text and "exchange (or an outer sync) 20.0 ms" in text
    assert "gradient exchange 50.0 ms" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
