"""A worker from "another host" for the join test: `python -m tests.fault.joiner RUNS_DIR`.

It imports torch first (seconds on a busy machine), then waits until the job has formed
its first generation, finds the job's store in the launcher's event log and joins it through
`shoal.worker`, as a worker that the local launcher did not start."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import shoal.worker  # the slow import, done before the job is looked up
from shoal.runtime.protocol import STORE_ENV


def main(runs: Path, timeout: float = 120.0) -> int:
    events = runs / "quickstart" / "logs" / "fault_events.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # the launcher writes the store's port once, at its start
        lines = events.read_text().splitlines() if events.is_file() else []
        ports = [json.loads(line)["port"] for line in lines if '"store"' in line]
        if ports and any("generation 1:" in line for line in lines):
            os.environ[STORE_ENV] = f"127.0.0.1:{ports[-1]}"
            run_dir = events.parents[1]
            return shoal.worker.main([str(run_dir / "config.toml"), "--run-dir", str(run_dir)])
        time.sleep(0.2)
    print("joiner: no running job found", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
