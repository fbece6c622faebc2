"""Prometheus metrics of the sidecar, the Redis store and the flusher, built against an
injected registry.

Label sets are bounded: method (the fixed RPC names), code (gRPC status names), reason (the
fixed ErrorInfo reasons), script (the fixed Lua script names), job_type (the five job types, or
``other``), scope (organization, team, project). No organization, user, reservation or free text
ever becomes a label — except ``organization`` on the opt-in per-organization balance gauges,
which exist only for the bounded list an operator names in ECU_METRICS_ORGS (at most
``MAX_METRICS_ORGS``).

Who exports what (docs/operations.md lists every series):

- the sidecar (``Metrics``): RPCs, refusals, insufficient-ECU rejections by scope, the sweeper,
  the rate card; and through ``StoreMetrics`` the latency and errors of each Redis script.
  Without a ledger it also exports ``ecu_outbox_length`` (the outboxes it serves and bounds).
- the flusher (``FlusherMetrics``; inside ``serve`` on the embedded default, else
  ``ecu-sidecar flush``): throughput, lag, drift, rebuilds, notifications, and the money that
  moved, by job type, counted from the outbox events it writes to the ledger — the one place
  that sees every state change of every sidecar, sweeps inside scripts included — plus the
  holds outstanding across all organizations.

One module per part, every name re-exported here: ``process`` (what every process exports:
build and store info, Redis script latency), ``sidecar``, ``flusher``, and ``http_server``
(/metrics and the probes).
"""

from __future__ import annotations

from ecu_sidecar.metrics.flusher import (
    JOB_TYPES,
    MAX_METRICS_ORGS,
    NOTIFICATION_KINDS,
    FlusherMetrics,
    job_type_label,
)
from ecu_sidecar.metrics.http_server import Check, serve_http
from ecu_sidecar.metrics.process import LATENCY_BUCKETS, StoreMetrics, process_metrics
from ecu_sidecar.metrics.sidecar import SCOPES, Metrics

__all__ = [
    "JOB_TYPES",
    "LATENCY_BUCKETS",
    "MAX_METRICS_ORGS",
    "NOTIFICATION_KINDS",
    "SCOPES",
    "Check",
    "FlusherMetrics",
    "Metrics",
    "StoreMetrics",
    "job_type_label",
    "process_metrics",
    "serve_http",
]
