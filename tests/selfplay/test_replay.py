"""Self-play records and the replay buffer: targets from each mover's side, the ring keeps the
newest positions, a saved and restored buffer samples the same batches bit for bit, and the
training step lowers the loss on what it trains on."""

from __future__ import annotations

import io

import numpy as np
import torch

from shoal.selfplay.games import get_game
from shoal.selfplay.learn import train_steps
from shoal.selfplay.network import PolicyValueNet, evaluator, loss
from shoal.selfplay.play import GameRecord, SelfPlaySettings, play_games
from shoal.selfplay.replay import ReplayBuffer

TTT = get_game("tictactoe")


def record(rows: int, start: float, version: int = 0) -> GameRecord:
    values = torch.arange(rows, dtype=torch.float32) + start
    return GameRecord(planes=values.view(rows, 1, 1, 1).expand(rows, 2, 3, 3).clone(),
                      policy_targets=torch.full((rows, 9), 1 / 9), value_targets=values, weight_version=version,
                      moves=rows, result=0.0)


def test_self_play_records_hold_every_position_with_the_movers_result():
    torch.manual_seed(0)
    net = PolicyValueNet(TTT, channels=8, blocks=1).eval()
    settings = SelfPlaySettings(simulations=16, dirichlet_alpha=1.0, temperature_moves=9)
    records = play_games(TTT, evaluator(net), 6, settings, np.random.default_rng(0), weight_version=3)
    assert len(records) == 6
    for r in records:
        assert r.weight_version == 3 and 5 <= r.moves <= 9
        assert r.planes.shape == (r.moves, 2, 3, 3) and r.policy_targets.shape == (r.moves, 9)
        assert torch.allclose(r.policy_targets.sum(1), torch.ones(r.moves))
        # stones on the board grow by one per ply, and the value flips sign per ply
        assert [int(p.sum()) for p in r.planes] == list(range(r.moves))
        expected = [r.result if i % 2 == 0 else -r.result for i in range(r.moves)]
        assert r.value_targets.tolist() == expected
        # a decisive game was won by whoever moved last
        if r.result != 0:
            assert r.value_targets[-1] == 1.0


def test_selfplay_value_target_q_mixes_the_search_value_into_the_targets():
    """selfplay.value_target_q reaches the actors' settings: same games (same seed), targets
    (1 - w) z + w q, so they move off the pure results toward the searches' values."""
    from shoal.config import Config
    from shoal.selfplay.setup import selfplay_settings
    cfg = Config()
    cfg.selfplay.game, cfg.selfplay.simulations, cfg.selfplay.temperature_moves = "tictactoe", 16, 9
    cfg.selfplay.value_target_q = 0.5
    settings = selfplay_settings(cfg)
    assert settings.value_target_q == 0.5
    net = PolicyValueNet(TTT, channels=8, blocks=1).eval()
    played = {}
    for w in (0.0, 0.5):
        settings.value_target_q = w
        played[w] = play_games(TTT, evaluator(net), 4, settings, np.random.default_rng(0), weight_version=0)
    for plain, mixed in zip(played[0.0], played[0.5]):
        assert torch.equal(plain.planes, mixed.planes)
        z = plain.value_targets
        q = 2 * mixed.value_targets - z  # the root values the mixed targets were made from
        assert q.abs().max() <= 1.0 + 1e-6 and not torch.equal(mixed.value_targets, z)


def test_the_ring_keeps_the_newest_positions():
    buffer = ReplayBuffer(10)
    buffer.add([record(4, 0.0), record(4, 100.0)])
    assert len(buffer) == 8
    buffer.add([record(5, 200.0, version=2)])
    assert len(buffer) == 10 and buffer.positions_added == 13 and buffer.games_added == 3
    held = sorted(buffer.storage["value_targets"].tolist())
    assert held == [1.0, 2.0, 3.0, 100.0, 101.0, 102.0, 103.0, 200.0, 201.0, 202.0, 203.0, 204.0][2:]
    assert sorted(buffer.versions.tolist()).count(2) == 5
    buffer.add([record(25, 1000.0)])  # longer than the buffer: its last 10 positions
    assert sorted(buffer.storage["value_targets"].tolist()) == [1015.0 + i for i in range(10)]


def test_a_restored_buffer_samples_the_same_batches():
    buffer = ReplayBuffer(50)
    buffer.add([record(7, float(10 * k)) for k in range(5)])
    generator = torch.Generator().manual_seed(1)
    buffer.sample(16, generator)
    saved, generator_state = buffer.state_dict(), generator.get_state()
    blob = io.BytesIO()
    torch.save(saved, blob)
    blob.seek(0)
    restored = ReplayBuffer(50)
    restored.load_state_dict(torch.load(blob, weights_only=True))
    resumed_generator = torch.Generator()
    resumed_generator.set_state(generator_state)
    for _ in range(3):
        ahead = buffer.sample(16, generator)
        again = restored.sample(16, resumed_generator)
        assert all(torch.equal(a, b) for a, b in zip(ahead, again))
    more = [record(30, 500.0)]  # the ring then wraps the same way in both
    buffer.add(more)
    restored.add(more)
    assert all(torch.equal(buffer.storage[k], restored.storage[k]) for k in buffer.storage)
    assert buffer.cursor == restored.cursor and torch.equal(buffer.versions, restored.versions)


def test_restoring_into_another_capacity_names_the_setting():
    buffer = ReplayBuffer(20)
    buffer.add([record(3, 0.0)])
    try:
        ReplayBuffer(30).load_state_dict(buffer.state_dict())
    except ValueError as error:
        assert "replay_size" in str(error)
    else:
        raise AssertionError("a capacity mismatch was accepted")


def test_train_steps_fit_the_buffer():
    torch.manual_seed(0)
    net = PolicyValueNet(TTT, channels=16, blocks=1)
    records = play_games(TTT, evaluator(net.eval()), 8, SelfPlaySettings(simulations=8, dirichlet_alpha=1.0),
                         np.random.default_rng(0), 0)
    buffer = ReplayBuffer(1000)
    buffer.add(records)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    everything = tuple(buffer.storage[k][:len(buffer)] for k in ("planes", "policy_targets", "value_targets"))

    def losses_on_the_buffer():
        with torch.no_grad():
            return loss(net, *everything)

    before = losses_on_the_buffer()
    result = train_steps(net, optimizer, buffer, 30, 32, generator, TTT.symmetries)
    after = losses_on_the_buffer()
    assert set(result) == {"loss", "policy_loss", "value_loss"} and all(np.isfinite(v) for v in result.values())
    # the policy loss cannot fall below the targets' entropy (8 simulations: wide); the value's can
    assert after.value < 0.7 * before.value and after.policy < before.policy, (before, after)
