"""The sidecar's metrics (``Metrics``): RPCs, refusals, insufficient-ECU rejections by scope,
rebuilds, degraded mode, the sweeper, the rate card, and the store's through ``StoreMetrics``.
Without a ledger it also exports ``ecu_outbox_length`` (the outboxes it serves and bounds).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ecu_sidecar.metrics.process import LATENCY_BUCKETS, StoreMetrics

__all__ = ["SCOPES", "Metrics"]

#: Values of the ``scope`` label of ecu_insufficient_ecu_total.
SCOPES = frozenset({"organization", "team", "project", "job"})


class Metrics:
    """The sidecar's metrics: the gRPC edge, the sweeper, the rate card, the store."""

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
        self._rpc_series: dict[tuple[str, str], tuple[Any, Any]] = {}
        self.errors = Counter(
            "ecu_rpc_errors_total",
            "RPCs refused, by method and ErrorInfo reason.",
            ["method", "reason"],
            registry=registry,
        )
        self.insufficient = Counter(
            "ecu_insufficient_ecu_total",
            "Reservations refused for insufficient ECU, by the scope that could not cover them "
            "(organization, team, project).",
            ["scope"],
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
        self.rebuilds = Counter(
            "ecu_sidecar_rebuilds_total",
            "Organizations this sidecar found missing from Redis and asked the ledger for, by "
            "result: rebuilt (from the ledger), raced (another process rebuilt it first), "
            "unknown (the ledger does not know it either).",
            ["result"],
            registry=registry,
        )
        for result in ("rebuilt", "raced", "unknown"):
            self.rebuilds.labels(result)
        self.degraded_grants = Counter(
            "ecu_degraded_grants_total",
            "Holds granted locally while Redis was unreachable (opt-in degraded mode).",
            registry=registry,
        )
        self.degraded_uecu = Counter(
            "ecu_degraded_granted_uecu_total",
            "µECU of holds granted locally while Redis was unreachable: the overspend the "
            "degraded allowance permitted.",
            registry=registry,
        )
        self.degraded_pending = Gauge(
            "ecu_degraded_journal_pending",
            "Degraded-mode decisions in the local journal not yet replayed into Redis.",
            registry=registry,
        )
        self.degraded_replay_failures = Counter(
            "ecu_degraded_replay_failures_total",
            "Degraded-mode journal entries Redis definitely refused on replay (marked failed and "
            "kept in the journal for review).",
            registry=registry,
        )
        self.store = StoreMetrics.of(registry)
        """Redis script latency and errors (attached to the store by the server)."""
        self.outbox_length: Gauge | None = None
        """ecu_outbox_length, when this sidecar exports it (export_outbox_length)."""
        # Exported at 0 from the start, so the first failure is an increase an alert can see.
        self.rate_card_reloads.labels("failed")

    def rate_card_loaded(self, version: str) -> None:
        """Point ecu_rate_card_info at the version now pricing (the old series is removed)."""
        self.rate_card.clear()
        self.rate_card.labels(version).set(1)

    def rpc_done(self, method: str, code: str, seconds: float) -> None:
        """Count one RPC by its status and observe its time. The labelled children are kept
        (``labels()`` checks and looks up its labels under a lock, a microsecond each call)."""
        series = self._rpc_series.get((method, code))
        if series is None:
            series = (self.rpcs.labels(method, code), self.latency.labels(method))
            self._rpc_series[(method, code)] = series
        series[0].inc()
        series[1].observe(seconds)

    def rejected_insufficient(self, scope: str) -> None:
        """Count one insufficient-ECU refusal of the given scope."""
        self.insufficient.labels(scope if scope in SCOPES else "organization").inc()

    def export_outbox_length(self) -> Gauge:
        """``ecu_outbox_length`` from the sidecar itself, registered on first call: a sidecar
        without a ledger has no flusher to export it, and sets it to the events left in the
        outboxes of the organizations it serves after trimming them (ECU_OUTBOX_MAX_LEN). The
        same series name as the flusher's (FlusherMetrics.outbox_length), never in the same
        process: a flusher exists only with a ledger."""
        if self.outbox_length is None:
            self.outbox_length = Gauge(
                "ecu_outbox_length",
                "Events in the outbox streams of the organizations this sidecar serves (a "
                "sidecar without a ledger, which trims them to ECU_OUTBOX_MAX_LEN).",
                registry=self.registry,
            )
        return self.outbox_length
