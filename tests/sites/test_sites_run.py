"""Sites training with `shoal run` as a user types it: one run per site, the outer sync over mutual TLS.

Slow: several worker processes; run under the CPU lock (`flock /tmp/shoal-cpu.lock`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from shoal.config import Config
from shoal.data.sampler import ShardedSampler
from shoal.runtime.protocol import SAMPLE_LOG_ENV
from shoal.sites.certs import make_site_certs
from tests.conftest import SHOAL, TINY, free_port, shoal, train_losses, wait_for
from tests.sites.listening import listening, process_tree, site_address, wildcard

pytestmark = pytest.mark.slow

DILOCO = ["sync.method=diloco", "sync.inner_steps=5", "sync.compression=none", "sync.outer_lr=0.7",
          "sync.outer_momentum=0.9", "launch.threads=1", "log.progress=plain", "log.tensorboard=false",
          "checkpoint.every=0"]


def site_args(name: str, ports: dict[str, int], certs: Path, *extra: str) -> list[str]:
    peers = ",".join(f"{p}=127.0.0.1:{port}" for p, port in ports.items() if p != name)
    return [*TINY, *DILOCO, f"log.name={name}", f"sites.name={name}", f"sites.listen=127.0.0.1:{ports[name]}",
            f"sites.peers={peers}", f"sites.certs={certs}", *extra]


def start(args: list[str], cwd: Path, log: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([SHOAL, "run", *args], cwd=cwd, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True, env=env)


def test_two_sites_over_tls_reach_the_losses_of_one_gloo_job(tmp_path):
    """Site a and site b (one worker each) against one 2-worker job whose replicas average over Gloo:
    the same data per replica and the same fp32 outer average (a/2 + b/2 is exact either way), so the
    per-step losses agree to the bit: the plain job logs (la + lb) / 2."""
    certs = tmp_path / "certs"
    make_site_certs(certs, ["a", "b"])
    ports = {"a": free_port(), "b": free_port()}
    steps = ["train.steps=20", "launch.nproc=1"]
    procs = [start(site_args(n, ports, certs, *steps), tmp_path, tmp_path / f"{n}.out") for n in ("a", "b")]
    plain = shoal("run", *TINY, *DILOCO, "train.steps=20", "log.name=plain", cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr[-2000:]
    for proc, name in zip(procs, "ab"):
        assert proc.wait(240) == 0, (tmp_path / f"{name}.out").read_text()[-3000:]
    out_a = (tmp_path / "a.out").read_text()
    assert out_a.count("with every site") == 4, out_a  # rounds after steps 5, 10, 15, 20
    la, lb, lp = (train_losses(tmp_path / "runs" / n) for n in ("a", "b", "plain"))
    assert sorted(lp) == sorted(la) == sorted(lb) == list(range(1, 21))
    for step in lp:
        both = (la[step] + lb[step]) / 2  # float32 losses: their float64 mean is exact, as the job's
        assert both == lp[step], f"step {step}: sites {both!r}, one Gloo job {lp[step]!r}"
    assert la[20] != lb[20]  # each site trains on its own share of the data


def test_sites_of_different_sizes_read_every_sample_of_every_step_once(tmp_path):
    """Site a trains on 2 workers, site b on 1, DiLoCo across them: each site knows only its own size, yet
    the workers of both together read every step's global batch exactly once (equal shares per site,
    each split between the site's own workers; docs/sites.md)."""
    certs = tmp_path / "certs"
    make_site_certs(certs, ["a", "b"])
    ports = {"a": free_port(), "b": free_port()}
    samples = tmp_path / "samples"
    env = {**os.environ, SAMPLE_LOG_ENV: str(samples)}
    steps = 10
    procs = {name: start(site_args(name, ports, certs, f"train.steps={steps}", f"launch.nproc={nproc}"), tmp_path,
                         tmp_path / f"{name}.out", env) for name, nproc in (("a", 2), ("b", 1))}
    for name, proc in procs.items():
        assert proc.wait(240) == 0, read(tmp_path / f"{name}.out")[-3000:]
    assert read(tmp_path / "a.out").count("with every site") == 2  # rounds after steps 5 and 10
    by_worker = {}
    for path in sorted(samples.glob("*.jsonl")):  # a-rank0, a-rank1, b-rank0: site-name order, then rank
        records = [json.loads(line) for line in path.read_text().splitlines()]
        assert [r["step"] for r in records] == list(range(steps)), path.name
        by_worker[path.name.split("-pid")[0]] = records
    assert list(by_worker) == ["a-rank0", "a-rank1", "b-rank0"]
    total = int(re.search(r"; (\d+) training samples", read(tmp_path / "b.out")).group(1))
    one = ShardedSampler(total, 8, Config().train.seed)  # train.batch_size = 8, the whole of every step
    for step in range(steps):
        read_ids = [i for records in by_worker.values() for i in records[step]["ids"]]
        assert read_ids == one.next_batch(0, 1).tolist(), f"step {step}: the sites' workers read {read_ids}"
    assert [len(by_worker[w][0]["ids"]) for w in by_worker] == [2, 2, 4]  # b's one worker reads a's two's share


def read(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


def step_records(samples: Path, site: str) -> list[list[dict]]:
    """Site `site`'s rank-0 step records, one list per process in the order they ran (a torn last line of a
    killed process left out)."""
    files = sorted(samples.glob(f"{site}-rank0-pid*.jsonl"), key=lambda f: f.stat().st_mtime)
    return [[json.loads(line) for line in f.read_text().splitlines() if line.endswith("}")] for f in files]


def lineage(records: list[dict]) -> list[dict]:
    """The steps that count, in the order the records were written: a record of step s replaces the records of
    steps s and later (the run moved back to s: those were of a model it then discarded)."""
    kept: list[dict] = []
    for record in records:
        while kept and kept[-1]["step"] >= record["step"]:
            kept.pop()
        kept.append(record)
    return kept


def events_of(run_dir: Path, *kinds: str) -> list[dict]:
    return [e for e in map(json.loads, read(run_dir / "events.jsonl").splitlines()) if e["event"] in kinds]


def assert_each_sample_once(records: list[dict], out: Path, site: int) -> None:
    """`records` (a lineage) are steps 0..n-1, each on the sampler's batch of site `site`'s share (of 2), and
    no sample id is in two of them within an epoch."""
    assert [r["step"] for r in records] == list(range(len(records))), [r["step"] for r in records]
    total = int(re.search(r"; (\d+) training samples", read(out)).group(1))
    sampler = ShardedSampler(total, 8, Config().train.seed)  # train.batch_size = 8, each site reads half
    seen_ids: dict[int, set[int]] = {}
    for record in records:
        assert record["ids"] == sampler.next_batch(site, 2).tolist(), f"step {record['step']} read other samples"
        epoch = seen_ids.setdefault(sampler.epoch, set())  # the batch's own epoch
        assert not epoch & set(record["ids"]), f"step {record['step']} read a sample twice in its epoch"
        epoch.update(record["ids"])


def test_a_killed_site_is_dropped_and_rejoins_with_the_global_state(tmp_path):
    """Site a (2 workers: DDP inside, the average broadcast over its Gloo) and site b (1 worker):
    b is killed mid-run, a goes on alone; b is resumed, joins with a's outer model and trains to its
    last step, and every sample of b's share was read in exactly one step that counted."""
    certs = tmp_path / "certs"
    make_site_certs(certs, ["a", "b"])
    ports = {"a": free_port(), "b": free_port()}
    long = ["sites.grace_seconds=2", "checkpoint.every=5", "checkpoint.keep=2"]
    a_out, b_out, b2_out = tmp_path / "a.out", tmp_path / "b.out", tmp_path / "b2.out"
    samples = tmp_path / "samples"
    b_env = {**os.environ, SAMPLE_LOG_ENV: str(samples)}
    steps_b = 40
    a = start(site_args("a", ports, certs, *long, "train.steps=100000", "launch.nproc=2"), tmp_path, a_out)
    b = start(site_args("b", ports, certs, *long, f"train.steps={steps_b}", "launch.nproc=1"), tmp_path, b_out,
              b_env)
    b2 = None
    try:
        wait_for(lambda: "outer round 3 with every site" in read(b_out), 240, "three rounds of both sites")
        os.killpg(b.pid, signal.SIGKILL)
        b.wait(30)
        rounds = re.findall(r"outer round (\d+) (?:with every site|averaged over sites a, b)", read(b_out))
        averaged = 5 * int(rounds[-1])  # sync.inner_steps = 5: round k ends step 5k
        wait_for(lambda: "lost the link to site b" in read(a_out), 60, "a to notice b's death")
        seen = read(a_out).index("lost the link to site b")
        wait_for(lambda: "averaged over sites a\n" in read(a_out)[seen:], 60, "a to go on alone")
        # b resumes from its own checkpoint (taken after every round: its data position goes on from
        # there, nothing it contributed is read again) and takes a's newer outer model.
        b2 = start(site_args("b", ports, certs, *long, f"train.steps={steps_b}", "launch.nproc=1", "--resume"),
                   tmp_path, b2_out, b_env)
        wait_for(lambda: "with site a's outer model and momentum" in read(b2_out), 240, "b to join")
        resumed_at = int(re.search(r"resumed from \S+ at step (\d+)", read(b2_out)).group(1))
        assert "sent site b the state after outer round" in read(a_out)
        joined = read(a_out).rindex("sent site b the state after outer round")
        wait_for(lambda: "with every site" in read(a_out)[joined:], 120, "a round of both sites again")
        events = [json.loads(line) for line in read(tmp_path / "runs" / "a" / "events.jsonl").splitlines()]
        assert {"site_lost", "site_state_sent"} <= {e["event"] for e in events}
        assert b2.wait(240) == 0, read(b2_out)[-3000:]
    finally:
        for proc in (a, b, b2):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
    # The resumed process starts where a's state says b's steps end: after its last round with a (a crash
    # after a round and before its checkpoint: those steps are in the global model and are not read again;
    # a checkpoint after rounds of b alone: their steps are read again).
    killed, resumed = step_records(samples, "b")
    moved = events_of(tmp_path / "runs" / "b", "site_data_skipped", "site_data_reread")
    continued = (moved[0]["last"] if moved[0]["event"] == "site_data_skipped" else moved[0]["first"] - 1) if moved \
        else resumed_at
    assert resumed[0]["step"] == continued == averaged, (resumed[0]["step"], continued, resumed_at, averaged)
    # The audit: the counted steps are 0..steps_b-1, once each, each on the sampler's batch of b's
    # share (site 1 of 2), and no sample id twice in an epoch.
    assert_each_sample_once(lineage(killed + resumed), b_out, 1)


def rewinds(records: list[dict]) -> list[tuple[int, int]]:
    """Where a process's step records go back: (the last step before, the step after), in order."""
    return [(before["step"], after["step"]) for before, after in zip(records, records[1:])
            if after["step"] <= before["step"]]


def test_a_site_dropped_from_a_round_reads_again_the_steps_the_global_model_lacks(tmp_path):
    """Site a is stopped (SIGSTOP) after a round with site b: b drops it after the grace window and trains
    on alone; resumed (SIGCONT), a finds its link gone and trains on alone too. The two outer models now
    differ, and one site gives way and takes the other's state (the one behind, or the later name at the
    same round), with the map of the steps of each site that state holds: the steps it trained after its
    own entry there are in no part of the model, so it names them (log + site_data_reread) and trains them
    again on their own samples. Which site gives way depends on how far each got; either way each site's
    steps that count (its sample log, the re-read steps in place of the first reading) read every sample
    of its share once, and the re-read steps read exactly the samples they read the first time."""
    certs = tmp_path / "certs"
    make_site_certs(certs, ["a", "b"])
    ports = {"a": free_port(), "b": free_port()}
    out = {name: tmp_path / f"{name}.out" for name in "ab"}
    samples = tmp_path / "samples"
    env = {**os.environ, SAMPLE_LOG_ENV: str(samples)}
    args = ["sites.grace_seconds=2", "train.steps=100000", "launch.nproc=1"]
    procs = {name: start(site_args(name, ports, certs, *args), tmp_path, out[name], env) for name in "ab"}

    def reread() -> dict[str, list[dict]]:
        return {name: events_of(tmp_path / "runs" / name, "site_data_reread") for name in "ab"}

    def read_again() -> bool:  # the giving-way site has trained the last step it named once more
        for name, events in reread().items():
            if events:
                steps = [r["step"] for r in step_records(samples, name)[0]]
                return steps.count(events[0]["last"] - 1) >= 2  # records count steps from 0, the log from 1
        return False

    try:
        wait_for(lambda: "outer round 1 with every site" in read(out["a"]), 240, "a round of both sites")
        stopped = process_tree(procs["a"].pid)  # the launcher and its worker, which has a process group of its own
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        wait_for(lambda: "dropped site a from outer round" in read(out["b"]), 60, "b to drop the stopped site")
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        wait_for(lambda: any(reread().values()), 120, "a site to give way and name the steps it reads again")
        wait_for(read_again, 120, "the site that gave way to read those steps again")
    finally:
        for proc in procs.values():
            for pid in process_tree(proc.pid):  # the workers too: they have process groups of their own
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait(30)
    events = reread()
    assert any(events.values())
    for index, name in enumerate("ab"):
        (records,) = step_records(samples, name)  # one process per site: stopped and resumed, never restarted
        named = [(e["first"], e["last"]) for e in events[name]]
        # Each rewind of the sample log is one the site named: from the round that ended step `last` back to
        # the step after which the state taken holds its data (counted from 1 in the log, from 0 in records).
        # The event comes first: the last one may have no record after it yet.
        moved = rewinds(records)
        assert moved == [(last - 1, first - 1) for first, last in named][:len(moved)], (name, moved, named)
        assert len(named) - len(moved) in (0, 1), (name, moved, named)
        other = "b" if name == "a" else "a"
        for event in events[name]:
            first, last = event["first"], event["last"]
            assert (event["samples"], event["source"]) == ((last - first + 1) * 4, other), event
            assert first % 5 == 1 and last % 5 == 0, event  # sync.inner_steps = 5: rounds end steps 5k
            assert (f"site {name}: steps {first}-{last} ({event['samples']} samples of this site's share) are not "
                    f"in site {other}'s global model") in read(out[name])
        for first, last in named[:1]:  # read again: the same samples, once before the rewind and once after
            by_step: dict[int, list[list[int]]] = {}
            for record in records:
                by_step.setdefault(record["step"], []).append(record["ids"])
            assert all(len(by_step[s]) >= 2 and by_step[s][0] == by_step[s][1] for s in range(first - 1, last)), name
        assert_each_sample_once(lineage(records), out[name], index)


def test_no_process_of_a_sites_run_listens_on_every_interface(tmp_path):
    """Site a (2 workers) meets at a non-loopback `sites.internal`, site b (1 worker) on loopback: every
    listening socket of either run, launcher and workers alike, is on one address: a's store and Gloo on
    its internal address, each leader's plane on its `sites.listen`; none on 0.0.0.0 or ::."""
    internal = site_address()
    if internal is None:
        pytest.skip("this host has no IPv4 address besides loopback to stand for a site's own network")
    certs = tmp_path / "certs"
    make_site_certs(certs, ["a", "b"])
    ports = {"a": free_port(), "b": free_port()}
    long = ["train.steps=100000", "checkpoint.every=0"]
    a_out, b_out = tmp_path / "a.out", tmp_path / "b.out"
    a = start(site_args("a", ports, certs, *long, "launch.nproc=2", f"sites.internal={internal}"), tmp_path, a_out)
    b = start(site_args("b", ports, certs, *long, "launch.nproc=1"), tmp_path, b_out)
    try:
        wait_for(lambda: "outer round 1 with every site" in read(a_out), 240, "a round of both sites")
        a_listens, b_listens = listening(process_tree(a.pid)), listening(process_tree(b.pid))
        assert not wildcard(a_listens + b_listens), (a_listens, b_listens)
        assert ("127.0.0.1", ports["a"]) in a_listens and ("127.0.0.1", ports["b"]) in b_listens
        inside_a = [(host, port) for host, port in a_listens if port != ports["a"]]
        assert inside_a and all(host == internal for host, _ in inside_a), a_listens  # store and Gloo
    finally:
        for proc in (a, b):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
