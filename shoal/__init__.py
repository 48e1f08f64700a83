"""Shoal: distributed training for plain PyTorch models."""

from shoal.config import Config, ConfigError, load


def train(*args, **kwargs):
    """Train as `shoal run` does; see shoal/api.py (imported on first use: `import shoal` stays light)."""
    from shoal.api import train as _train
    return _train(*args, **kwargs)


__all__ = ["Config", "ConfigError", "load", "train"]
__version__ = "0.1.0"
