"""The files between actors and learner, in one process: a batch is whole or absent, ids never
repeat across a slot's replacements, the ledger reads back as written, old weights go but the
evaluated ones stay."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shoal.selfplay import transport


@dataclass
class Record:
    states: torch.Tensor
    policies: torch.Tensor
    weight_version: int
    moves: list


def records(n: int) -> list[Record]:
    return [Record(torch.full((k + 1, 2, 3), float(k)), torch.rand(k + 1, 9), 7, list(range(k + 1))) for k in range(n)]


def test_a_batch_reads_back_whole_and_a_partial_write_is_never_pending(tmp_path):
    written = records(3)
    transport.write_games(tmp_path, "actor0-i000-000000", written)
    # what an actor killed mid-write leaves: its hidden temporary file, never renamed into place
    (tmp_path / "selfplay" / "games" / ".actor1-i000-000000.safetensors.tmp").write_bytes(b"\x00" * 10)
    assert transport.pending_batches(tmp_path, set()) == ["actor0-i000-000000"]
    assert transport.pending_batches(tmp_path, {"actor0-i000-000000"}) == []
    assert transport.batch_games(tmp_path, "actor0-i000-000000") == 3
    back = transport.read_games(tmp_path, "actor0-i000-000000", Record)
    for a, b in zip(written, back):
        assert torch.equal(a.states, b.states) and torch.equal(a.policies, b.policies)
        assert (a.weight_version, a.moves) == (b.weight_version, b.moves)


def test_a_replacement_continues_its_slot_count(tmp_path):
    assert transport.next_incarnation(tmp_path, "actor", 1) == 0
    transport.write_games(tmp_path, transport.batch_id("actor", 1, 0, 0), records(1))
    transport.write_games(tmp_path, transport.batch_id("actor", 1, 2, 5), records(1))
    assert transport.next_incarnation(tmp_path, "actor", 1) == 3
    assert transport.next_incarnation(tmp_path, "actor", 0) == 0
    assert transport.slot_has_batches(tmp_path, "actor", 1, 2) and not transport.slot_has_batches(tmp_path, "actor", 1, 1)


def test_ledger_and_weights(tmp_path):
    transport.append_ledger(tmp_path, 1, ["a", "b"], 1e-3)
    transport.append_ledger(tmp_path, 2, ["c"], 5e-4)
    assert transport.read_ledger(tmp_path) == [["a", "b"], ["c"]]
    assert transport.read_ledger(tmp_path, "lr") == [1e-3, 5e-4]
    transport.write_ledger(tmp_path, [["a", "b"]], [1e-3])  # a resumed learner cuts the versions it trains again
    assert transport.read_ledger(tmp_path) == [["a", "b"]]
    assert transport.read_ledger(tmp_path, "lr") == [1e-3]
    for version in range(12):
        transport.publish_weights(tmp_path, version, {"w": torch.full((2,), float(version))}, keep_every=5)
    kept = [v for v, _ in transport.weight_versions(tmp_path)]
    assert kept == [0, 5, 8, 9, 10, 11]
    assert torch.equal(transport.load_weights(tmp_path, 11)["w"], torch.full((2,), 11.0))
    assert transport.load_weights(tmp_path, 3) is None
    assert transport.withdraw_weights_after(tmp_path, 9) == [10, 11] and transport.latest_version(tmp_path) == 9
