"""The rules: wins, draws and full boards of tic-tac-toe and Connect Four; the Connect Four
bitboard against a plain 2-D board on random games; encodings and symmetries."""

from __future__ import annotations

import numpy as np
import pytest

from shoal.selfplay.games import game_names, get_game

TTT = get_game("tictactoe")
C4 = get_game("connect4")


def play_all(game, moves):
    state = game.initial()
    for move in moves:
        assert game.outcome(state) is None, game.render(state)
        state = game.play(state, move)
    return state


def test_registry_names_the_games_and_rejects_an_unknown_one():
    assert {"tictactoe", "connect4"} <= set(game_names())
    with pytest.raises(ValueError, match="chess.*one of.*connect4"):
        get_game("chess")


def test_tictactoe_wins_draws_and_the_mover_perspective():
    # X: 0 1 2 along the top row; O: 3 4
    won = play_all(TTT, [0, 3, 1, 4, 2])
    assert TTT.outcome(won) == -1.0  # O is to move and has lost
    assert not TTT.legal(won).any()
    draw = play_all(TTT, [0, 1, 2, 4, 3, 5, 7, 6, 8])
    assert TTT.outcome(draw) == 0.0
    assert TTT.outcome(play_all(TTT, [4, 0])) is None
    diagonal = play_all(TTT, [4, 0, 2, 1, 6])
    assert TTT.outcome(diagonal) == -1.0
    with pytest.raises(ValueError, match="square 4 is taken"):
        TTT.play(play_all(TTT, [4]), 4)


def test_tictactoe_encoding_is_from_the_movers_side():
    state = play_all(TTT, [4, 0])  # X centre, O corner; X to move
    planes = TTT.encode(state)
    assert planes.shape == TTT.input_shape and planes.dtype == np.float32
    assert planes[0, 1, 1] == 1 and planes[1, 0, 0] == 1 and planes.sum() == 2
    after = TTT.encode(TTT.play(state, 8))  # now O to move: O's stones come first
    assert after[0, 0, 0] == 1 and after[1, 1, 1] == 1 and after[1, 2, 2] == 1


def naive_connect4(moves):
    """A 6x7 grid filled move by move and scanned for four in a row: the reference for the bitboard."""
    board = np.zeros((6, 7), dtype=int)  # row 0 at the bottom; 1 first player, 2 second
    heights = [0] * 7
    winner = 0
    for i, col in enumerate(moves):
        player = 1 + i % 2
        board[heights[col], col] = player
        heights[col] += 1
    for r in range(6):
        for c in range(7):
            p = board[r, c]
            if not p:
                continue
            for dr, dc in ((0, 1), (1, 0), (1, 1), (1, -1)):
                cells = [(r + k * dr, c + k * dc) for k in range(4)]
                if all(0 <= rr < 6 and 0 <= cc < 7 and board[rr, cc] == p for rr, cc in cells):
                    winner = p
    return board, heights, winner


def test_connect4_bitboard_agrees_with_a_plain_board_on_random_games():
    rng = np.random.default_rng(7)
    endings = {"win": 0, "draw": 0}
    for _ in range(300):
        state, moves = C4.initial(), []
        while C4.outcome(state) is None:
            board, heights, winner = naive_connect4(moves)
            assert winner == 0
            legal = C4.legal(state)
            assert list(legal) == [h < 6 for h in heights]
            planes = C4.encode(state)
            assert np.array_equal(C4.encode_batch([state, state])[1], planes)
            mover = 1 + len(moves) % 2
            # planes[:, row from the top, col]
            assert (planes[0][::-1] == (board == mover)).all() and (planes[1][::-1] == (board == 3 - mover)).all()
            move = int(rng.choice(np.flatnonzero(legal)))
            moves.append(move)
            state = C4.play(state, move)
        board, heights, winner = naive_connect4(moves)
        result = C4.outcome(state)
        if winner:
            assert result == -1.0, (moves, C4.render(state))  # whoever just moved won
            assert winner == 1 + (len(moves) - 1) % 2
            endings["win"] += 1
        else:
            assert result == 0.0 and sum(heights) == 42
            endings["draw"] += 1
    assert endings["win"] > 250


def test_connect4_full_column_and_a_full_board_draw():
    full_col = C4.from_moves("111111")
    assert not C4.legal(full_col)[0] and C4.legal(full_col)[1:].all()
    with pytest.raises(ValueError, match="column 0 is full"):
        C4.play(full_col, 0)
    # columns filled in the order 1,2 / 3,4 / 5,6 / 7 with a swap of colours per band: no four anywhere
    moves = "121212" "212121" "343434" "434343" "565656" "656565" "777777"
    _, heights, winner = naive_connect4([int(c) - 1 for c in moves])
    assert winner == 0 and sum(heights) == 42
    assert C4.outcome(C4.from_moves(moves)) == 0.0


def test_connect4_wins_in_every_direction():
    assert C4.outcome(C4.from_moves("1122334")) == -1.0  # horizontal
    assert C4.outcome(C4.from_moves("1212121")) == -1.0  # vertical
    assert C4.outcome(C4.from_moves("1223433454")) is None
    assert C4.outcome(C4.from_moves("12234334544")) == -1.0  # rising diagonal
    assert C4.outcome(C4.from_moves("7665455434")) is None
    assert C4.outcome(C4.from_moves("76654554344")) == -1.0  # falling diagonal


def test_symmetries_map_positions_and_policies_together():
    rng = np.random.default_rng(0)
    planes = rng.random((5, 2, 3, 3)).astype(np.float32)
    policy = rng.random((5, 9))
    copies = TTT.symmetries(planes, policy)
    assert len(copies) == 8 and np.array_equal(copies[0][0], planes) and np.array_equal(copies[0][1], policy)
    # a stone on square 0 with policy mass on square 0: every copy keeps them together
    one = np.zeros((1, 2, 3, 3), dtype=np.float32)
    one[0, 0, 0, 0] = 1
    mass = np.zeros((1, 9))
    mass[0, 0] = 1
    for p, q in TTT.symmetries(one, mass):
        assert np.array_equal(p[0, 0].reshape(9), q[0])
    c4 = C4.encode(C4.from_moves("1"))[None]
    c4_policy = np.eye(7)[[0]]
    (_, _), (mirrored, mirrored_policy) = C4.symmetries(c4, c4_policy)
    assert mirrored[0, 0, 5, 6] == 0 and mirrored[0, 1, 5, 6] == 1 and mirrored_policy[0, 6] == 1
