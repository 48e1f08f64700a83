"""Shoal's configuration: nested keyword-only dataclasses, TOML, `key.sub=value` overrides.

Every field is declared with `option(...)`, which carries a one-line help text and the
allowed values or range; `validate` checks them all and raises `ConfigError` naming the
field. The same metadata renders `shoal config` and docs/config.md.

The package's modules, each importing only those above it in this list:
- fields.py: `option`, `ConfigError`, `USER_ERROR`.
- training.py: the sections of one training run ([model] ... [fault]) and `rank_seed`.
- modes.py: the sections of federated learning, sites and self-play.
- schema.py: `Config` (every section) and `SECTIONS`.
- checks.py: `validate` and the [selfplay] and [sites] rules.
- loading.py: `load`, `apply_overrides`, `from_dict`; `to_toml` and `reference`.
Every name is imported from here (`from shoal.config import load`), never from a module inside.
"""

from __future__ import annotations

from shoal.config.checks import (LOOPBACK, SITE_NAME, per_step_unsupported, replica_group_size, site_peers,
                                 split_endpoint, validate, validate_selfplay, validate_sites)
from shoal.config.fields import USER_ERROR, ConfigError, _suggest, option
from shoal.config.loading import _coerce, apply_overrides, from_dict, load, reference, to_dict, to_toml
from shoal.config.modes import FederatedConfig, SelfplayConfig, SitesConfig
from shoal.config.schema import SECTIONS, Config, _field_types
from shoal.config.training import (COMPRESSION_HOOKS, OUTER_SYNC_METHODS, CheckpointConfig, DataConfig, FaultConfig,
                                   LaunchConfig, LogConfig, ModelConfig, ParallelConfig, SyncConfig, TrainConfig,
                                   rank_seed)

__all__ = [
    "COMPRESSION_HOOKS", "LOOPBACK", "OUTER_SYNC_METHODS", "SECTIONS", "SITE_NAME", "USER_ERROR",
    "CheckpointConfig", "Config", "ConfigError", "DataConfig", "FaultConfig", "FederatedConfig", "LaunchConfig",
    "LogConfig", "ModelConfig", "ParallelConfig", "SelfplayConfig", "SitesConfig", "SyncConfig", "TrainConfig",
    "apply_overrides", "from_dict", "load", "option", "per_step_unsupported", "rank_seed", "reference",
    "replica_group_size", "site_peers", "split_endpoint",
    "to_dict", "to_toml", "validate", "validate_selfplay", "validate_sites",
    # the helpers below keep their leading underscore; they are re-exported so that `shoal.config._coerce`
    # and its like still name what they named when this package was one module
    "_coerce", "_field_types", "_suggest",
]
