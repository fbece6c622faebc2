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
"""

from __future__ import annotations

import socket
import socketserver
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    make_wsgi_app,
)

from ecu_sidecar import __version__
from ecu_sidecar.model import JobType

if TYPE_CHECKING:
    from ecu_sidecar.ledger.events import Event

__all__ = [
    "LATENCY_BUCKETS",
    "MAX_METRICS_ORGS",
    "FlusherMetrics",
    "Metrics",
    "StoreMetrics",
    "serve_http",
]

#: 100 µs to ~1.6 s, doubling: resolves a loopback Redis round trip and a slow outage alike.
LATENCY_BUCKETS = tuple(0.0001 * 2**i for i in range(15))

#: Most organizations ECU_METRICS_ORGS may name (one series per organization and gauge).
MAX_METRICS_ORGS = 100

#: Values of the ``job_type`` label; anything else (an event from a newer sidecar) is "other".
JOB_TYPES = frozenset(j.value for j in JobType)

#: Values of the ``scope`` label of ecu_insufficient_ecu_total.
SCOPES = frozenset({"organization", "team", "project"})

#: Values of the ``kind`` label of ecu_notifications_total.
NOTIFICATION_KINDS = frozenset({"low_balance_20", "low_balance_5", "auto_topup_requested"})


def job_type_label(value: str) -> str:
    """A job type as a bounded label value."""
    return value if value in JOB_TYPES else "other"


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


class FlusherMetrics:
    """The flusher's metrics: throughput, lag, drift, rebuilds, notifications, money moved,
    holds outstanding, and the opt-in per-organization balances."""

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
        self.failed_cycles = Counter(
            "ecu_flusher_failed_cycles_total",
            "Flusher cycles that failed, by cause: redis (unreachable, silent or refusing) or "
            "ledger (a write or read refused or timed out). The cycle is retried with backoff.",
            ["cause"],
            registry=registry,
        )
        for cause in ("redis", "ledger"):
            self.failed_cycles.labels(cause)
        self.leftovers_removed = Counter(
            "ecu_flusher_leftover_entries_removed_total",
            "Outbox entries acknowledged but left in their stream (a flusher or Redis died "
            "between XACK and XDEL), deleted by the flusher.",
            registry=registry,
        )
        self.consumers_removed = Counter(
            "ecu_flusher_consumers_removed_total",
            "Consumers of the outbox group removed because they had nothing pending and were "
            "idle for ECU_FLUSHER_DEAD_CONSUMER_MS (flushers that died).",
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
        self.last_success = Gauge(
            "ecu_flusher_last_success_timestamp_seconds",
            "Unix time of the flusher's last cycle that reached Redis and the ledger.",
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
        self.key_loss_accounts = Gauge(
            "ecu_flusher_key_loss_accounts",
            "Organizations whose Redis keys did not add up in the last reconciliation pass (held "
            "against the active holds, the deadline, tombstone and grant-expiry indexes, the "
            "grants hash): a key lost beside the account; each is rebuilt from the ledger.",
            registry=registry,
        )
        self.repairs = Counter(
            "ecu_reconcile_repairs_total",
            "Balances repaired to the ledger's value.",
            registry=registry,
        )
        self.reconcile_errors = Counter(
            "ecu_flusher_reconcile_errors_total",
            "Organizations whose reconciliation failed in a pass (logged; the pass went on with "
            "the other organizations, and the next pass tries again).",
            registry=registry,
        )
        self.grants_voided = Counter(
            "ecu_flusher_grants_voided_total",
            "Pending ledger-first grants the flusher voided because Redis refused them "
            "(expired, balance limit, grant id used with other parameters).",
            registry=registry,
        )
        self.history_rebuilds = Counter(
            "ecu_flusher_history_rebuilds_total",
            "Organizations rebuilt from the ledger because the Redis node holding them changed "
            "history (a failover promoted a replica, or a restart): changes the ledger may hold "
            "and Redis lost are restored whole.",
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
        for kind in sorted(NOTIFICATION_KINDS):
            self.notifications.labels(kind)
        for result in ("written", "duplicate", "quarantined"):
            self.events.labels(result)

        def money(name: str, what: str) -> Counter:
            counter = Counter(
                name,
                f"µECU {what}, by job type (counted from the outbox events written to the "
                "ledger: every sidecar's, sweeps inside scripts included).",
                ["job_type"],
                registry=registry,
            )
            for job in sorted(JOB_TYPES):
                counter.labels(job)  # every job type exported from the start, at 0
            return counter

        self.reserved_uecu = money("ecu_reserved_uecu_total", "held by new reservations")
        self.committed_uecu = money(
            "ecu_committed_uecu_total", "billed by commits (late and orphan commits included)"
        )
        self.released_uecu = money(
            "ecu_released_uecu_total",
            "returned to available: releases, and the rest of holds committed below their amount",
        )
        self.expired_uecu = money("ecu_expired_uecu_total", "returned by holds that expired")
        self.overage_uecu = money(
            "ecu_overage_uecu_total", "billed above their hold by commits (bounded overage)"
        )
        self.unbilled_uecu = money(
            "ecu_unbilled_overage_uecu_total", "used above the overage bound, recorded unbilled"
        )
        self.late_unbilled_uecu = money(
            "ecu_late_unbilled_uecu_total",
            "used by late commits beyond what was available plus their bound, recorded unbilled",
        )
        self.holds_outstanding = Gauge(
            "ecu_holds_outstanding",
            "Active holds across every organization with an outbox (Redis ZCARD of the "
            "deadlines; every flusher reports the same total: aggregate with max).",
            registry=registry,
        )
        self.held_uecu = Gauge(
            "ecu_held_uecu",
            "µECU held by active holds across every organization with an outbox.",
            registry=registry,
        )
        self.org_balance = Gauge(
            "ecu_organization_balance_uecu",
            "Balance of each organization named in ECU_METRICS_ORGS (opt-in).",
            ["organization"],
            registry=registry,
        )
        self.org_available = Gauge(
            "ecu_organization_available_uecu",
            "Available (balance - held) of each organization named in ECU_METRICS_ORGS.",
            ["organization"],
            registry=registry,
        )
        self.org_held = Gauge(
            "ecu_organization_held_uecu",
            "Held µECU of each organization named in ECU_METRICS_ORGS.",
            ["organization"],
            registry=registry,
        )
        #: Event type -> (field, counter) of the µECU it moves (count_events).
        self._money_fields: dict[str, tuple[tuple[str, Counter], ...]] = {
            "reserve": (("amount", self.reserved_uecu),),
            "release": (("amount", self.released_uecu),),
            "expire": (("amount", self.expired_uecu),),
            "commit": (
                ("committed", self.committed_uecu),
                ("released", self.released_uecu),
                ("overage", self.overage_uecu),
                ("unbilled", self.unbilled_uecu),
            ),
        }

    def count_events(self, events: Iterable[Event]) -> None:
        """Count the money and notifications of outbox events the ledger recorded for the
        first time (``WriteResult.applied``): the sums per job type, added once per series."""
        money: dict[tuple[Counter, str], int] = {}
        notices: dict[str, int] = {}
        for ev in events:
            if ev.type == "notify":
                kind = ev.values["kind"]
                if kind in NOTIFICATION_KINDS:  # the ledger checked it; the label stays bounded
                    notices[kind] = notices.get(kind, 0) + 1
                continue
            series = self._money_fields.get(ev.type)
            if series is None:
                continue
            values = ev.values
            job = job_type_label(values["job"])
            for name, counter in series:
                if (
                    counter is self.unbilled_uecu
                    and values.get("late")
                    and not values.get("orphan")
                ):
                    counter = self.late_unbilled_uecu  # a late commit's rest: not an overage
                key = (counter, job)
                money[key] = money.get(key, 0) + values[name]
        for kind, n in notices.items():
            self.notifications.labels(kind).inc(n)
        for (counter, job), total in money.items():
            if total:
                counter.labels(job).inc(total)

    def organization(self, org: str, balance: int, held: int) -> None:
        """Set the opt-in gauges of one configured organization."""
        self.org_balance.labels(org).set(balance)
        self.org_held.labels(org).set(held)
        self.org_available.labels(org).set(balance - held)

    def forget_organization(self, org: str) -> None:
        """Drop the series of an organization that has no account (any more)."""
        for gauge in (self.org_balance, self.org_held, self.org_available):
            try:
                gauge.remove(org)
            except KeyError:
                pass


#: A probe of serve_http: (healthy, one line saying why).
Check = Callable[[], tuple[bool, str]]


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """No access log: probes and scrapes would fill the process's log."""


def serve_http(listen: str, registry: CollectorRegistry, checks: Mapping[str, Check]) -> Any:
    """Serve ``registry`` at /metrics on ``listen`` (host:port) in a daemon thread, as
    prometheus_client's start_http_server does, and each path of ``checks`` as a probe: 200
    or 503 with its line of text. Returns the server (``server_port``, ``shutdown()``)."""
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        check = checks.get(environ.get("PATH_INFO", ""))
        if check is None:
            return metrics(environ, start_response)
        healthy, text = check()
        status = "200 OK" if healthy else "503 Service Unavailable"
        start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
        return [text.encode() + b"\n"]

    host, _, port = listen.rpartition(":")
    family, *_, address = socket.getaddrinfo(
        host.strip("[]"), int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    server_class = type("_Server", (_Server,), {"address_family": family})
    httpd = make_server(address[0], int(port), app, server_class, handler_class=_Quiet)
    threading.Thread(target=httpd.serve_forever, name="ecu-http", daemon=True).start()
    return httpd
