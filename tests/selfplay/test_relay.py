"""The relay between a self-play job and a host that adds actors (shoal/selfplay/relay.py), over a
real c10d TCPStore in one process: weights go out whole, batches come in whole and renamed with
the host's number, a batch that is not one is dropped, the job's end reaches the host, a host
with another network is refused naming the setting, and a resumed job keeps numbering hosts on."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist

from shoal.selfplay import transport
from shoal.selfplay.games import get_game
from shoal.selfplay.network import PolicyValueNet, evaluator
from shoal.selfplay.play import GameRecord, SelfPlaySettings, play_games
from shoal.selfplay.relay import GAMES_QUEUE, HostRelay, JobMismatch, JobRelay

TTT = get_game("tictactoe")
META = {"game": "tictactoe", "channels": 8, "blocks": 1}


def stores():
    server = dist.TCPStore("127.0.0.1", 0, None, True, timeout=timedelta(seconds=10), wait_for_workers=False)
    client = dist.TCPStore("127.0.0.1", server.port, None, False, timeout=timedelta(seconds=10),
                           wait_for_workers=False)
    return server, client


def test_weights_out_games_in_and_the_end(tmp_path):
    job_dir, host_dir = tmp_path / "job", tmp_path / "host"
    server, client = stores()
    job = JobRelay(server, job_dir, META)
    torch.manual_seed(0)
    net = PolicyValueNet(TTT, channels=8, blocks=1)
    transport.publish_weights(job_dir, 3, net.state_dict())
    job.step()

    host = HostRelay(client, host_dir, META)
    assert host.host == 1 and job.joined() == [1]
    assert host.step() is None
    assert transport.latest_version(host_dir) == 3
    received = transport.load_weights(host_dir, 3)
    assert all(torch.equal(received[k], v) for k, v in net.state_dict().items())

    records = play_games(TTT, evaluator(net.eval()), 3, SelfPlaySettings(simulations=4), np.random.default_rng(0), 3)
    transport.write_games(host_dir, "actor0-i000-000000", records)
    client.queue_push(GAMES_QUEUE, b"h1-actor0-i000-000009\nnot a safetensors file")
    client.queue_push(GAMES_QUEUE, b"../../escape\n" + transport.games_path(host_dir, "actor0-i000-000000").read_bytes())
    host.step()
    host.step()  # a batch is sent once
    assert job.step() == ["h1-actor0-i000-000000"]
    assert transport.pending_batches(job_dir, set()) == ["h1-actor0-i000-000000"]
    back = transport.read_games(job_dir, "h1-actor0-i000-000000", GameRecord)
    assert len(back) == 3 and all(torch.equal(a.planes, b.planes) and torch.equal(a.policy_targets, b.policy_targets)
                                  for a, b in zip(back, records))
    assert not list((job_dir / "selfplay" / "games").glob(".*")), "a dropped batch left a file behind"

    transport.publish_weights(job_dir, 4, net.state_dict())
    transport.mark_finished(job_dir)
    job.step()
    assert host.step() == "finished" and transport.latest_version(host_dir) == 4
    host.leave()
    job.wait_for_hosts(5.0)  # returns at once: the one host left


def test_a_host_with_another_network_is_refused_by_name(tmp_path):
    server, client = stores()
    JobRelay(server, tmp_path / "job", META)
    with pytest.raises(JobMismatch, match="selfplay.channels = 16 here, but the job runs with selfplay.channels = 8"):
        HostRelay(client, tmp_path / "host", {**META, "channels": 16})


def test_a_resumed_job_numbers_new_hosts_after_the_ones_it_ingested(tmp_path):
    job_dir = tmp_path / "job"
    (job_dir / "selfplay" / "games").mkdir(parents=True)
    (job_dir / "selfplay" / "games" / "h4-actor1-i000-000002.safetensors").write_bytes(b"")
    server, client = stores()
    JobRelay(server, job_dir, META)
    assert HostRelay(client, tmp_path / "host", META).host == 5
