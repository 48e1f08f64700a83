"""The fault-tolerant launcher's progress, read from a real c10d store as workers publish it."""

import json
from datetime import timedelta

import torch.distributed as dist

from shoal.observe.fleet import PROGRESS_KEY, FleetProgress
from shoal.observe.progress import Progress


def test_plain_lines_appear_even_when_polls_skip_the_printed_steps(capsys):
    store = dist.TCPStore("127.0.0.1", 0, None, True, timeout=timedelta(seconds=10), wait_for_workers=False)
    fleet = FleetProgress(store, 100, mode="plain", every=10, samples_per_step=32, interval=0.0)
    fleet.poll(now=1.0)  # nothing published yet: nothing shown
    for now, (step, size) in enumerate([(7, 4), (13, 4), (19, 4), (26, 3), (41, 3), (100, 4)], start=2):
        store.set(PROGRESS_KEY, json.dumps({"step": step, "loss": 2.0 / step, "gen": size, "size": size}))
        fleet.poll(now=float(now))
    fleet.close()
    lines = capsys.readouterr().out.splitlines()
    steps = [line.split()[1] for line in lines if line.startswith("step ") and "/" in line.split()[1]]
    assert steps == ["13/100", "26/100", "41/100", "100/100"]  # crossed 10, 20, 40 (30 skipped over), the end
    assert "step 26: 3 worker(s) training (generation 3)" in lines
    assert "step 100: 4 worker(s) training (generation 4)" in lines
    assert "loss 0.1538" in lines[0] and "192 samples/s" in lines[0]  # 6 steps x 32 samples in one second


def test_progress_called_every_step_prints_every_nth():
    printed = []
    progress = Progress(25, 0, mode="plain", every=10)
    import builtins
    real = builtins.print
    builtins.print = lambda *a, **k: printed.append(a[0])
    try:
        for step in range(1, 26):
            progress.update(step, 1.0, 1.0)
    finally:
        builtins.print = real
    assert [p.split()[1] for p in printed] == ["10/25", "20/25", "25/25"]
