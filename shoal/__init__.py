"""Shoal: distributed training for plain PyTorch models."""

from shoal.config import Config, ConfigError, load

__all__ = ["Config", "ConfigError", "load"]
__version__ = "0.1.0"
