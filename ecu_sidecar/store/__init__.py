"""The store: Redis (standalone, Cluster or embedded) behind one adapter and its port."""

from ecu_sidecar.store.port import Outbox, Store
from ecu_sidecar.store.redis_store import RedisStore
from ecu_sidecar.store.transport import Transport

__all__ = ["Outbox", "RedisStore", "Store", "Transport"]
