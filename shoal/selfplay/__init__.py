"""Self-play the AlphaGo way (Silver et al. 2016, 2017, 2018): actors play games against
themselves with tree search guided by the current network, a learner trains the network on a
replay buffer of those games, and new weights go back to the actors.

The engine, usable in one process:
  games/      the rules, one file per game (`get_game(name)`; tictactoe, connect4)
  network.py  the residual policy-value network and its loss
  mcts.py     PUCT search with batched leaf evaluation across many games at once
  play.py     self-play games -> GameRecord training examples
  replay.py   the replay buffer (exact state_dict for resume)
  learn.py    the learner's optimizer steps on buffer samples
  evaluate.py players (network, plain MCTS, minimax, solver) and matches between them
  solver.py   a Connect Four solver and a fixed solved position set
  local.py    a one-process loop: play, train, repeat
The distributed runtime (actors, learner and evaluator as Shoal workers, the files between them)
lives beside it: actor.py, learner.py, evaluator.py, transport.py, process.py, setup.py.
"""
