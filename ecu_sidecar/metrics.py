"""Prometheus metrics of the gRPC edge, built against an injected registry.

Label sets are bounded: method (the fixed RPC names), code (gRPC status names) and reason
(the fixed ErrorInfo reasons). No organization, user or reservation ever becomes a label.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["LATENCY_BUCKETS", "FlusherMetrics", "Metrics"]

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
        self.rate_card_reloads = Counter(
            "ecu_rate_card_reloads_total",
            "Rate card reloads, by result (ok, failed).",
            ["result"],
            registry=registry,
        )
        self.rate_card = Gauge(
            "ecu_rate_card_info",
            "The rate card version pricing now (value 1; one series).",
            ["version"],
            registry=registry,
        )

    def rate_card_loaded(self, version: str) -> None:
        """Point ecu_rate_card_info at the version now pricing (the old series is removed)."""
        self.rate_card.clear()
        self.rate_card.labels(version).set(1)


class FlusherMetrics:
    """The flusher's metrics: throughput, lag, drift, rebuilds, notifications."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.events = Counter(
            "ecu_flusher_events_total",
            "Outbox events handled, by result (written: newly in the ledger; duplicate: the "
            "ledger had the event id; quarantined: refused by the ledger, kept for review).",
            ["result"],
            registry=registry,
        )
        self.write_errors = Counter(
            "ecu_flusher_write_errors_total",
            "Ledger transactions that failed (batch kept, retried).",
            registry=registry,
        )
        self.batch_size = Histogram(
            "ecu_flusher_batch_size",
            "Events per ledger transaction.",
            buckets=(1, 10, 50, 100, 500, 1_000, 5_000, 10_000, 50_000),
            registry=registry,
        )
        self.batch_seconds = Histogram(
            "ecu_flusher_batch_duration_seconds",
            "Time to write and acknowledge one batch.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.outbox_length = Gauge(
            "ecu_outbox_length",
            "Events in all outbox streams (not yet acknowledged).",
            registry=registry,
        )
        self.pending = Gauge(
            "ecu_outbox_pending",
            "Events delivered to a flusher and not yet acknowledged.",
            registry=registry,
        )
        self.lag_seconds = Gauge(
            "ecu_outbox_oldest_unflushed_age_seconds",
            "Age of the oldest event not yet in the ledger (0 when the outboxes are empty).",
            registry=registry,
        )
        self.drift_uecu = Gauge(
            "ecu_reconcile_drift_uecu",
            "Sum of |Redis - ledger| balance found by the last reconciliation pass.",
            registry=registry,
        )
        self.drift_accounts = Gauge(
            "ecu_reconcile_drift_accounts",
            "Organizations whose balance drifted in the last reconciliation pass.",
            registry=registry,
        )
        self.repairs = Counter(
            "ecu_reconcile_repairs_total",
            "Balances repaired to the ledger's value.",
            registry=registry,
        )
        self.hydrations = Counter(
            "ecu_hydrations_total",
            "Organizations rebuilt in Redis from the ledger.",
            registry=registry,
        )
        self.notifications = Counter(
            "ecu_notifications_total",
            "Notifications moved into the ledger, by kind (low_balance_20, low_balance_5, "
            "auto_topup_requested).",
            ["kind"],
            registry=registry,
        )
