"""What every process exports, sidecar or flusher: its build and store (``process_metrics``),
and the latency and errors of its Redis script calls (``StoreMetrics``, one per registry).
"""

from __future__ import annotations

import weakref
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from ecu_sidecar import __version__

__all__ = ["LATENCY_BUCKETS", "StoreMetrics", "process_metrics"]

#: 100 µs to ~1.6 s, doubling: resolves a loopback Redis round trip and a slow outage alike.
LATENCY_BUCKETS = tuple(0.0001 * 2**i for i in range(15))


class StoreMetrics:
    """Latency and errors of each Redis script call (one instance per registry: the sidecar and
    a flusher inside the same process share the store and its series)."""

    _by_registry: weakref.WeakKeyDictionary[CollectorRegistry, StoreMetrics] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.script_seconds = Histogram(
            "ecu_redis_script_duration_seconds",
            "Time of one Redis script call (queueing for a connection included), by script.",
            ["script"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.script_errors = Counter(
            "ecu_redis_script_errors_total",
            "Redis script calls that failed, by script and error (timeout: no answer within "
            "ECU_REDIS_TIMEOUT_MS; unreachable: connection failed; refused: READONLY, OOM, "
            "LOADING, CLUSTERDOWN and alike; unconfirmed: fewer replicas than "
            "ECU_REDIS_WAIT_REPLICAS acknowledged the write in time; error: any other Redis "
            "error).",
            ["script", "error"],
            registry=registry,
        )
        self._script_timers: dict[str, Any] = {}
        StoreMetrics._by_registry[registry] = self

    def script_done(self, script: str, seconds: float) -> None:
        """Observe one script call's time. The labelled child is kept: ``labels()`` checks
        and looks up its labels under a lock on every call, a microsecond each time."""
        timer = self._script_timers.get(script)
        if timer is None:
            timer = self._script_timers[script] = self.script_seconds.labels(script)
        timer.observe(seconds)

    @classmethod
    def of(cls, registry: CollectorRegistry) -> StoreMetrics:
        """The registry's StoreMetrics, created on first use."""
        found = cls._by_registry.get(registry)
        return found if found is not None else cls(registry)


def process_metrics(registry: CollectorRegistry, component: str, store: str) -> None:
    """What every process exports once, whatever else it runs: ``ecu_build_info`` (its version
    and whether it is a sidecar or a flusher), ``ecu_store_info`` (the Redis it uses, which
    the alerts carry as their ``store`` label) and the process's CPU, memory and open files
    (``process_*``). A sidecar that runs the flusher in-process is one process: a sidecar."""
    build = Gauge(
        "ecu_build_info",
        "The running ecu-sidecar version and component (sidecar or flusher); value 1.",
        ["version", "component"],
        registry=registry,
    )
    build.labels(__version__, component).set(1)
    store_info = Gauge(
        "ecu_store_info",
        "The Redis this process uses, its URL without credentials ('embedded' for the "
        "in-process store); value 1.",
        ["store"],
        registry=registry,
    )
    store_info.labels(store).set(1)
    ProcessCollector(registry=registry)
