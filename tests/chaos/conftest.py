"""Fixtures of the fault and load suite (see tests/chaos/support.py)."""

from tests.chaos.support import redis_servers

__all__ = ["redis_servers"]
