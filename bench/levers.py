"""Patches of the sidecar, applied in the benchmark's sidecar process only
(``python -m bench.servers sidecar --patch NAME``): each puts back what the product had before
a performance change, so the levers section measures that change's before and after in one
run. Nothing here is imported by the product (docs/benchmarks.md has the figures).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["PATCHES", "apply"]


def _redis_py_pool() -> None:
    """The store as it was before the multiplexed script channel: every script call through
    redis-py's blocking pool, with redis-py's socket timeout set.

    The product change it measures backwards (ecu_sidecar/store/multiplex.py): script calls to a
    standalone Redis share one connection, written straight onto the socket and matched to
    their replies in order, and the pool lost ``socket_timeout`` (the store's outer
    bound, Transport.bounded, stays). This patch puts both back.
    """
    from ecu_sidecar.store import redis_store
    from ecu_sidecar.store.transport import Transport

    original = redis_store.RedisStore.from_settings.__func__  # type: ignore[attr-defined]

    def from_settings(cls: Any, settings: Any) -> Any:
        if settings.embedded or settings.redis_cluster:
            return original(cls, settings)
        transport = Transport.pooled(settings)
        kwargs = transport.client.connection_pool.connection_kwargs
        kwargs["socket_timeout"] = settings.redis_timeout_ms / 1000
        return cls(transport, settings)

    redis_store.RedisStore.from_settings = classmethod(from_settings)  # type: ignore[assignment]


PATCHES: dict[str, Callable[[], None]] = {
    "redis-py-pool": _redis_py_pool,
}


def apply(name: str) -> None:
    """Apply one named patch (before the server is built)."""
    try:
        patch = PATCHES[name]
    except KeyError:
        raise SystemExit(f"unknown patch {name!r}; known: {', '.join(sorted(PATCHES))}") from None
    patch()
