"""The store port: Redis (standalone, Cluster or embedded) behind one adapter."""

from ecu_sidecar.store.redis_store import RedisStore

__all__ = ["RedisStore"]
