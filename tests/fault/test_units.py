"""One-process checks of the fault-tolerance pieces: spec parsing, [fault] rules, optimizer
state for joiners, uneven data shares, the sample audit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from shoal import config
from shoal.config import ConfigError
from shoal.data.sampler import ShardedSampler
from shoal.fault import chaos
from shoal.fault.audit import audit
from shoal.fault.state import materialize_optimizer_state, state_tensors
from shoal.launch.supervisor import check_fault_tolerant
from tests.conftest import wait_for


def test_chaos_spec_parses_launcher_and_step_injections():
    timed, step = chaos.parse("kill=random,every=15s;hang=1,step=7,at=before,for=500ms,size=3")
    assert (timed.action, timed.target, timed.every, timed.start) == ("kill", "random", 15.0, 15.0)
    assert (step.action, step.target, step.step, step.at, step.duration, step.size) == ("hang", "1", 7, "before", 0.5, 3)
    assert chaos.parse("slow=0,every=2m,for=1s,count=3")[0].every == 120.0
    assert chaos.parse("kill=1,step=20,rejoin=3")[0].rejoin == 3


@pytest.mark.parametrize("spec, message", [
    ("kill=random", "either every=DURATION"),
    ("kill=random,every=fast", "not a duration"),
    ("explode=1,every=1s", "exactly one of kill, hang, slow"),
    ("kill=1,step=3,at=middle", "not one of before, during, after, transfer"),
    ("kill=source,step=3", "at=transfer goes with the target 'source'"),
    ("kill=1,every=1s,colour=red", "unknown key(s) colour"),
    ("kill", "must look like key=value"),
    ("hang=1,step=3,rejoin=2", "rejoin= applies to step kills"),
    ("kill=random,every=5s,rejoin=2", "rejoin= applies to step kills"),
    ("kill=1,step=3,rejoin=soon", "rejoin='soon' must be a number of steps"),
    ("", "empty spec"),
])
def test_chaos_spec_errors_name_the_bad_part(spec, message):
    with pytest.raises(chaos.ChaosError) as err:
        chaos.parse(spec)
    assert message in str(err.value)


@pytest.mark.parametrize("overrides, message", [
    (["fault.min_workers=3", "fault.max_workers=2"], "fault.min_workers = 3 is above fault.max_workers = 2"),
    (["fault.max_workers=1"], "launch.nproc = 2 is above fault.max_workers = 1"),
    (["fault.step_timeout=0.6"], "too small to ever succeed"),
    (["train.batch_size=2", "fault.max_workers=3"], "cannot give each of fault.max_workers = 3 workers a sample"),
])
def test_bad_fault_config_is_refused_before_start(overrides, message):
    cfg = config.load(None, ["fault.enabled=true", "launch.nproc=2", *overrides])
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_fault_tolerant(cfg, 2, None)


def test_chaos_needs_fault_tolerance_and_a_valid_spec():
    with pytest.raises(ConfigError, match="needs fault.enabled"):
        check_fault_tolerant(config.load(None, []), 2, "kill=random,every=1s")
    cfg = config.load(None, ["fault.enabled=true"])
    with pytest.raises(ConfigError, match="not a duration"):
        check_fault_tolerant(cfg, 2, "kill=random,every=soon")
    assert check_fault_tolerant(cfg, 2, "kill=random,every=1s") is True
    # no whole replica per worker: restart-from-checkpoint instead of per-step recovery
    assert check_fault_tolerant(config.load(None, ["fault.enabled=true", "parallel.dp_shard=2"]), 2, None) is False


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.1),
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1),
])
def test_materialized_optimizer_state_changes_nothing(make):
    """A joiner creates empty optimizer state to receive into; it must train like a fresh one."""
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    opt_a, opt_b = make(a.parameters()), make(b.parameters())
    materialize_optimizer_state(opt_b)
    assert torch.equal(a.weight, b.weight) and len(state_tensors(b, opt_b)) > 2
    x = torch.randn(8, 4)
    for model, opt in ((a, opt_a), (b, opt_b)):
        model(x).square().sum().backward()
        opt.step()
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


def test_uneven_shares_cover_the_global_batch():
    shares = [ShardedSampler(100, 32, 1) for _ in range(3)]
    parts = [s.next_batch(r, 3) for r, s in enumerate(shares)]
    assert [len(p) for p in parts] == [11, 11, 10]
    assert torch.equal(torch.cat(parts), ShardedSampler(100, 32, 1).next_batch(0, 1))


def test_audit_finds_lost_repeated_and_diverged_steps(tmp_path):
    sampler = ShardedSampler(64, 8, 5)
    batches = [sampler.next_batch(0, 1).tolist() for _ in range(4)]
    rows = [{"step": s, "t": s, "member": 0, "gen": 1, "size": 2, "epoch": 0, "params": "a", "loss": 1.0,
             "ids": batches[s]} for s in range(4)]
    (tmp_path / "member0.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert audit(tmp_path, num_samples=64, global_batch=8, grad_accum=1, seed=5).clean
    rows[2]["ids"] = batches[1]  # step 2 retrained step 1's samples: repeated and lost
    rows[3] = {**rows[3], "member": 1}
    other = {**rows[3], "params": "b"}
    (tmp_path / "member0.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:3]) + "\n")
    (tmp_path / "member1.jsonl").write_text(json.dumps(rows[3]) + "\n" + json.dumps(other) + "\n")
    result = audit(tmp_path, num_samples=64, global_batch=8, grad_accum=1, seed=5)
    assert result.wrong_batch_steps == [2] and result.duplicated == 8 and result.disagreeing_steps == [3]


def test_state_buffer_round_trip_moves_everything():
    """What a joiner receives: odd-sized parameters (unaligned offsets), AdamW moments, step,
    data position and RNG, from a trained replica into a fresh one."""
    from shoal.fault.state import materialize_optimizer_state, pack_state, unpack_state

    class Host:  # the TrainingHost methods pack_state and unpack_state use, as a Trainer without DiLoCo has them
        def __init__(self, model):
            self.model, self.optimizer, self.step = model, torch.optim.AdamW(model.parameters(), lr=0.01), 0
            self.sampler = ShardedSampler(100, 10, 1)

        def state_tensors(self):
            materialize_optimizer_state(self.optimizer)
            return state_tensors(self.model, self.optimizer)

        def data_position(self):
            return self.sampler.state_dict()

        def set_data_position(self, position):
            self.sampler.load_state_dict(position)

        def set_step(self, step):
            self.step = step

        def state_received(self):
            pass

    def replica(seed):
        torch.manual_seed(seed)
        # 12 parameters in 3 tensors: with their AdamW state 156 bytes, so the int64 meta is unaligned
        return Host(torch.nn.Sequential(torch.nn.Linear(3, 2, bias=False), torch.nn.Linear(2, 2)))
    source, joiner = replica(0), replica(1)
    for _ in range(3):
        source.model(torch.randn(4, 3)).sum().backward()
        source.optimizer.step()
        source.sampler.next_batch(0, 1)
    source.step = 3
    rng = torch.get_rng_state()
    buffer = pack_state(source)
    torch.manual_seed(99)
    unpack_state(joiner, buffer)
    assert torch.equal(torch.get_rng_state(), rng)
    assert (joiner.step, joiner.sampler.state_dict()) == (3, source.sampler.state_dict())
    for a, b in zip(state_tensors(source.model, source.optimizer), state_tensors(joiner.model, joiner.optimizer)):
        assert torch.equal(a, b)


def _state(pid: int) -> str:
    return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]


@pytest.mark.slow
def test_chaos_monkey_kills_and_pauses_real_processes():
    """The launcher's clock: a kill is a real SIGKILL, a slow-down a real SIGSTOP that ends."""
    import subprocess
    import sys
    import time
    victims = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(2)]
    try:
        monkey = chaos.ChaosMonkey(chaos.parse("kill=0,every=10s,count=1;slow=1,every=10s,for=300ms,count=1"),
                                   started=0.0)
        assert monkey.tick(5.0, {0: victims[0].pid, 1: victims[1].pid}) == []  # not due yet
        fired = monkey.tick(10.0, {0: victims[0].pid, 1: victims[1].pid})
        assert [(a, s) for a, s, _ in fired] == [("kill", 0), ("slow", 1)]
        assert victims[0].wait(timeout=10) == -9
        deadline = time.monotonic() + 30
        while _state(victims[1].pid) != "T" and time.monotonic() < deadline:  # paused (SIGSTOP) ...
            time.sleep(0.01)
        assert _state(victims[1].pid) == "T"
        while _state(victims[1].pid) == "T" and time.monotonic() < deadline:  # ... then resumed (SIGCONT)
            time.sleep(0.05)
        assert _state(victims[1].pid) in ("S", "R") and victims[1].poll() is None
        assert monkey.tick(20.0, {1: victims[1].pid}) == []  # count=1: each fired once
    finally:
        for v in victims:
            v.kill()
            v.wait()


def _sockets() -> int:
    return sum(os.readlink(f"/proc/self/fd/{fd}").startswith("socket:") for fd in os.listdir("/proc/self/fd")
               if os.path.exists(f"/proc/self/fd/{fd}"))


def test_an_abandoned_generation_is_destroyed_once_its_collective_ends():
    """A group kept alive after its generation was abandoned can busy-poll Gloo's event loop
    (bytes arriving for a collective this rank gave up); one destroyed while its collective is
    in flight blocks in its destructor until the step timeout. Two ranks of a real Gloo group,
    in two threads: rank 0 gives up an all-reduce rank 1 has not reached."""
    import threading
    from datetime import timedelta

    import torch.distributed as dist

    from shoal.fault.errors import GenerationBroken
    from shoal.fault.generation import Generation
    from shoal.fault.replica import Replica
    from shoal.fault.store import ReplicaStore

    store = dist.HashStore()
    before = _sockets()
    pgs = {}

    def connect(rank):
        options = dist.ProcessGroupGloo._Options()
        options._devices = [dist.ProcessGroupGloo.create_default_device()]
        options._timeout = timedelta(seconds=20)
        pgs[rank] = dist.ProcessGroupGloo(dist.PrefixStore("pg", store), rank, 2, options)

    threads = [threading.Thread(target=connect, args=(rank,)) for rank in (0, 1)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    replica = Replica(member=0)
    generation = Generation(ReplicaStore(store, replica), replica, timeout=timedelta(seconds=20))
    generation.enter(1, [0, 1])
    generation.groups.pg = pgs.pop(0)
    store.set("ft/gen/1/abort", "1")  # the coordinator saw a member leave
    with pytest.raises(GenerationBroken, match="aborted"):
        generation.wait(generation.pg.allreduce([torch.ones(4)]), "allreduce", 0)
    connected = _sockets()
    assert connected > before
    started = time.monotonic()
    generation.groups.abandon()  # its all-reduce is still in flight: the group is kept, nothing blocks
    assert time.monotonic() - started < 1.0 and _sockets() == connected and generation.groups.retiring
    pgs[1].allreduce([torch.ones(4)]).wait()  # rank 1 arrives: the collective ends (rank 0's side a moment later)
    wait_for(lambda: all(w.is_completed() for _, _, works in generation.groups.retiring for w in works), 10,
             "rank 0's side of the all-reduce")
    started = time.monotonic()
    generation.groups.reap()  # at the next step: destroyed, its sockets closed
    assert time.monotonic() - started < 1.0 and not generation.groups.retiring
    assert _sockets() < connected


@pytest.mark.slow
@pytest.mark.parametrize("partner_fired_in, code", [(5, -9), (-1, 0)])
def test_a_kill_whose_partner_fired_still_fires_in_the_smaller_group(partner_fired_in, code):
    """Two kills at one step with size=3: if slot 1 died first and the survivors regrouped at 2
    before slot 2 reached its point, slot 2 still dies at its next point (a real SIGKILL of a
    real process); while its partner has not fired, size=3 keeps it waiting."""
    script = f"""
from shoal.fault.chaos import ChaosPoints, parse
points = ChaosPoints(parse("kill=1,step=20,size=3;kill=2,step=20,size=3"), slot=2, nproc=3,
                     claim=lambda k, gen: True, fired_in=lambda k: {partner_fired_in} if k == 0 else -1)
points.fire("during", 20, size=2, gen=6)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == code, done.stderr
