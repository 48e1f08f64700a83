"""Surviving failure: atomic checkpoints, per-step membership and recovery, failure injection."""
