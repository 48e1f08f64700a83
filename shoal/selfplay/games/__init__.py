"""The games of self-play, one module each; `get_game(name)` finds one by its module's name.

A new game is one file here that defines `GAME`, an object with the `Game` protocol of base.py
(rules, encoding for the network, optional symmetries); nothing else changes.
"""

from __future__ import annotations

import importlib
import pkgutil

from shoal.selfplay.games.base import Game, State


def game_names() -> list[str]:
    """The games there are: every module of this package but base."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "base")


def get_game(name: str) -> Game:
    """The game `name` ('tictactoe', 'connect4', ...); ValueError naming the games there are."""
    if name not in game_names():
        raise ValueError(f"game '{name}' is not a module of shoal/selfplay/games/; one of {', '.join(game_names())}")
    return importlib.import_module(f"{__name__}.{name}").GAME


__all__ = ["Game", "State", "game_names", "get_game"]
