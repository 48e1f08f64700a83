"""The whole config: `Config`, one field per section in TOML order; `SECTIONS`, each section's name and
dataclass; and `_field_types`, the type each field's value is parsed and checked to.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

from shoal.config.modes import FederatedConfig, SelfplayConfig, SitesConfig
from shoal.config.training import (CheckpointConfig, DataConfig, FaultConfig, LaunchConfig, LogConfig, ModelConfig,
                                   ParallelConfig, SyncConfig, TrainConfig)


@dataclass(kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    log: LogConfig = field(default_factory=LogConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
    sites: SitesConfig = field(default_factory=SitesConfig)
    selfplay: SelfplayConfig = field(default_factory=SelfplayConfig)


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]


def _field_types(section_cls: type) -> dict[str, type]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}
