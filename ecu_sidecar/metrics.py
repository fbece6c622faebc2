"""Prometheus metrics of the gRPC edge, built against an injected registry.

Label sets are bounded: method (the fixed RPC names), code (gRPC status names) and reason
(the fixed ErrorInfo reasons). No organization, user or reservation ever becomes a label.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

__all__ = ["LATENCY_BUCKETS", "Metrics"]

#: 100 µs to ~1.6 s, doubling: resolves a loopback Redis round trip and a slow outage alike.
LATENCY_BUCKETS = tuple(0.0001 * 2**i for i in range(15))


class Metrics:
    """The sidecar's RPC metrics."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.rpcs = Counter(
            "ecu_rpc_requests_total",
            "RPCs handled, by method and gRPC status code.",
            ["method", "code"],
            registry=registry,
        )
        self.latency = Histogram(
            "ecu_rpc_duration_seconds",
            "Time to handle an RPC, by method.",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.errors = Counter(
            "ecu_rpc_errors_total",
            "RPCs refused, by method and ErrorInfo reason.",
            ["method", "reason"],
            registry=registry,
        )
        self.swept = Counter(
            "ecu_holds_swept_total", "Holds expired by the background sweeper.", registry=registry
        )
