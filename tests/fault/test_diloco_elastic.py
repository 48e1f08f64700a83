"""DiLoCo through membership changes (issue 6, item 4), with real processes and real signals:
three replicas sync every 5 steps; one is SIGKILLed in the middle of an inner phase and
another inside an outer sync. The dead replicas drop out of the average, their replacements
join with the current outer parameters, and every replica holds the same outer parameters
after every sync."""

from __future__ import annotations

import json
import os
import subprocess
from collections import defaultdict

import pytest

from shoal.runtime.protocol import SAMPLE_LOG_ENV
from tests.conftest import SHOAL, metric_records

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

STEPS, H = 160, 40
JOB = ["model.name=gpt", "model.flavour=debug", "model.dim=64", "model.n_layers=2",  # not the quickstart's size
       "data.source=stdlib", "data.seq_len=32", "train.batch_size=24",
       "train.warmup_steps=2", "train.eval_every=0", "train.lr=3e-3", f"train.steps={STEPS}", "launch.threads=1",
       "launch.nproc=3", "fault.enabled=true", "fault.step_timeout=5", "fault.max_restarts=3", "log.progress=plain",
       "sync.method=diloco", f"sync.inner_steps={H}", "sync.compression=int8", "checkpoint.every=0"]
# Slot 1 dies at step 2, early in the first inner phase; slot 2 inside the outer sync of step 80.
SCENARIO = "kill=1,step=2,at=before;kill=2,step=45,at=during,size=3"


def test_diloco_replicas_drop_out_and_rejoin_at_outer_syncs(tmp_path):
    samples = tmp_path / "samples"
    samples.mkdir()
    out = subprocess.run([SHOAL, "run", *JOB, "--chaos", SCENARIO], cwd=tmp_path, text=True, capture_output=True,
                         stdin=subprocess.DEVNULL, env={**os.environ, SAMPLE_LOG_ENV: str(samples)}, timeout=220)
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "runs" / "quickstart"
    events = [json.loads(line) for line in (run / "logs" / "fault_events.jsonl").read_text().splitlines()]
    assert [e["code"] for e in events if e["event"] == "exit"].count(-9) == 2

    syncs: dict[int, list[dict]] = defaultdict(list)
    for path in samples.glob("*.outer"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            syncs[record["sync"]].append(record)
    assert sorted(syncs) == list(range(1, STEPS // H + 1))
    for number, records in syncs.items():  # equal outer parameters after every sync, whoever took part
        assert len({r["outer"] for r in records}) == 1, (number, records)
        assert all(r["step"] == number * H for r in records), records
    weights = [records[0]["weight"] for _, records in sorted(syncs.items())]
    sizes = [max(r["size"] for r in records) for _, records in sorted(syncs.items())]
    members = {r["member"] for records in syncs.values() for r in records}
    # The replica killed at step 2 lost its first phase: the first average has weight 2 of 3. Its
    # replacement joins (at that sync, with weight 0, when it is up in time: the usual case).
    assert weights[0] == 2.0 and 2.0 in weights[1:3], weights
    assert sizes[-1] == 3 and weights[-1] == 3.0, (sizes, weights)  # whole again at the end
    assert {0, 3, 4} <= members and not {1, 2} & {r["member"] for r in syncs[len(syncs)]}, members
    logs = "".join(path.read_text() for path in (run / "logs").glob("rank*.log"))
    if sizes[0] == 3:
        assert "joined during the outer sync" in logs
    assert out.stderr.count("state from worker") >= 2  # each replacement received the outer state

    losses = [r["loss"] for r in metric_records(run, "train")]
    assert losses[-1] < 0.8 * losses[0], (losses[0], losses[-1])
