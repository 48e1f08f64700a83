"""How a config field is declared, and how a mistake in one is reported.

`option(...)` is a dataclass field that carries its one-line help text and its allowed values or
range: `validate` (checks.py) checks them and `reference` (loading.py) renders them for `shoal config`
and docs/config.md. `ConfigError` names the bad field; `_suggest` adds the "did you mean".
"""

from __future__ import annotations

import difflib
from dataclasses import field
from typing import Any


class ConfigError(ValueError):
    """A user's mistake in a config file, an override or a command-line flag."""


USER_ERROR = 2
"""Exit code of any Shoal process that stopped on a user's mistake (after one `shoal: error:` line)."""


def option(default: Any, help: str, *, choices: tuple | None = None,
           min: float | None = None, max: float | None = None) -> Any:
    """A config field with its one-line help, allowed values and range."""
    meta = {"help": help, "choices": choices, "min": min, "max": max}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _suggest(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1)
    return f" (did you mean '{close[0]}'?)" if close else f" (valid: {', '.join(valid)})"
