"""A config in and out. In: `load` (a TOML file, or the defaults, then `section.key=value` overrides,
then `validate`), built on `from_dict` and `apply_overrides`, which reject unknown sections and keys
(with a "did you mean") and values of the wrong type. Out: `to_dict`, `to_toml` (the config.toml
written to every run directory) and `reference` (`shoal config` and docs/config.md).
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

from shoal.config.checks import validate
from shoal.config.fields import ConfigError, _suggest
from shoal.config.schema import SECTIONS, Config, _field_types


def _coerce(where: str, value: Any, kind: type) -> Any:
    """Check one value's type; strings from the command line are parsed first."""
    if isinstance(value, str) and kind is not str:
        text = value.strip()
        if kind is list:  # a command-line list: comma-separated names
            return [item.strip() for item in text.strip("[]").replace('"', "").replace("'", "").split(",")
                    if item.strip()]
        try:
            if kind is bool:
                if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                value = text.lower() in ("true", "1", "yes")
            else:
                value = kind(text)
        except ValueError:
            raise ConfigError(f"{where}: expected {kind.__name__}, got '{value}'") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def from_dict(raw: dict[str, Any], base: Config | None = None) -> Config:
    """Build a Config from nested dicts (parsed TOML), checking keys and types."""
    cfg = base or Config()
    for section, values in raw.items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown section [{section}]{_suggest(section, list(SECTIONS))}")
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table of key = value")
        target = getattr(cfg, section)
        types = _field_types(type(target))
        for key, value in values.items():
            if key not in types:
                raise ConfigError(f"unknown key {section}.{key}{_suggest(key, list(types))}")
            setattr(target, key, _coerce(f"{section}.{key}", value, types[key]))
    return cfg


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `section.key=value` strings, as typed on the command line."""
    for item in overrides:
        name, sep, value = item.partition("=")
        section, dot, key = name.strip().partition(".")
        if not sep or not dot or not key:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        from_dict({section: {key: value}}, cfg)
    return cfg


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a TOML file (or the defaults when path is None), apply overrides and validate."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: malformed TOML: {err}") from None
        from_dict(raw, cfg)
        if not cfg.log.name:
            cfg.log.name = path.stem if path.stem != "config" else path.parent.name
    apply_overrides(cfg, overrides or [])
    if not cfg.log.name:
        cfg.log.name = "shoal"
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(cfg)


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML, the form written to every run directory."""
    lines: list[str] = []
    for section, values in to_dict(cfg).items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, str):
                text = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
            else:
                text = repr(value)
            lines.append(f"{key} = {text}")
        lines.append("")
    return "\n".join(lines)


def reference(markdown: bool = False) -> str:
    """Every field with its default and one-line doc: `shoal config` and docs/config.md."""
    out: list[str] = []
    for section, cls in SECTIONS.items():
        types = _field_types(cls)
        defaults = cls()
        out.append(f"## [{section}]\n" if markdown else f"[{section}]")
        if markdown:
            out += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        for f in dataclasses.fields(cls):
            meta = f.metadata
            extra = ""
            if meta.get("choices"):
                extra = " One of: " + ", ".join(map(str, meta["choices"])) + "."
            default = getattr(defaults, f.name)
            if markdown:
                out.append(f"| `{f.name}` | {types[f.name].__name__} | `{default!r}` | {meta['help']}{extra} |")
            else:
                out.append(f"  {f.name} = {default!r}  ({types[f.name].__name__})\n      {meta['help']}{extra}")
        out.append("")
    return "\n".join(out)
