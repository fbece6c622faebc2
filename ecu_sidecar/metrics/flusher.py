"""The flusher's metrics (``FlusherMetrics``): throughput, lag, drift, rebuilds, notifications,
and the money that moved, by job type, counted from the outbox events it writes to the ledger;
the holds outstanding across all organizations; the opt-in per-organization balances.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ecu_sidecar.jobs import JobState
from ecu_sidecar.metrics.process import LATENCY_BUCKETS
from ecu_sidecar.model import JobType

if TYPE_CHECKING:
    from ecu_sidecar.ledger.events import Event

__all__ = [
    "JOB_TYPES",
    "MAX_METRICS_ORGS",
    "NOTIFICATION_KINDS",
    "FlusherMetrics",
    "job_type_label",
]

#: Most organizations ECU_METRICS_ORGS may name (one series per organization and gauge).
MAX_METRICS_ORGS = 100

#: Values of the ``job_type`` label; anything else (an event from a newer sidecar) is "other".
JOB_TYPES = frozenset(j.value for j in JobType)

#: Buckets of ecu_job_preview_accuracy (committed ÷ approved of a closed job).
ACCURACY_BUCKETS = (*(i / 10 for i in range(1, 10)), 0.95, 1.0, 1.05, 1.1, 1.25, 1.5, 2.0)

#: Values of the ``kind`` label of ecu_notifications_total.
NOTIFICATION_KINDS = frozenset({"low_balance_20", "low_balance_5", "auto_topup_requested"})


def job_type_label(value: str) -> str:
    """A job type as a bounded label value."""
    return value if value in JOB_TYPES else "other"


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
        self.cycle_seconds = Gauge(
            "ecu_reconcile_cycle_seconds",
            "How long the last full reconciliation cycle over every organization took (passes "
            "of at most ECU_RECONCILE_BATCH organizations each, ECU_RECONCILE_INTERVAL_MS apart).",
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
        # Approved jobs (docs/jobs.md): counted at their job_open and job_close events.
        self.jobs_opened = Counter(
            "ecu_jobs_opened_total",
            "Approved jobs opened, by job type.",
            ["job_type"],
            registry=registry,
        )
        self.jobs_ended = Counter(
            "ecu_jobs_ended_total",
            "Approved jobs ended, by job type and state (closed by their owner, or abandoned: "
            "no step and no heartbeat for their ttl).",
            ["job_type", "state"],
            registry=registry,
        )
        self.job_approved_uecu = money(
            "ecu_job_approved_uecu_total", "approved by the jobs opened (held at approval)"
        )
        self.job_committed_uecu = money(
            "ecu_job_committed_uecu_total",
            "billed by the steps of jobs ended, counted at their end (compare with "
            "ecu_job_approved_uecu_total)",
        )
        self.preview_accuracy = Histogram(
            "ecu_job_preview_accuracy",
            "Committed ÷ approved of each closed job, by job type: how pessimistic the previews "
            "users approve are (1 = the worst case was spent; above 1 only with policy wallet). "
            "Abandoned jobs are not observed.",
            ["job_type"],
            buckets=ACCURACY_BUCKETS,
            registry=registry,
        )
        self.jobs_open = Gauge(
            "ecu_jobs_open",
            "Open approved jobs across every organization, as the ledger records them (behind "
            "Redis by the flush lag; every flusher reports the same total: aggregate with max).",
            registry=registry,
        )
        for job in sorted(JOB_TYPES):
            self.jobs_opened.labels(job)
            self.preview_accuracy.labels(job)
            for state in (JobState.CLOSED, JobState.ABANDONED):
                self.jobs_ended.labels(job, state.word)
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
            "job_open": (("amount", self.job_approved_uecu),),
            "job_close": (("committed", self.job_committed_uecu),),
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
            if ev.type == "job_open":
                self.jobs_opened.labels(job).inc()
            elif ev.type == "job_close":
                self._job_ended(job, values)
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

    def _job_ended(self, job: str, values: dict[str, Any]) -> None:
        state = JobState(values["state"])  # C or X: the ledger checked it
        self.jobs_ended.labels(job, state.word).inc()
        if state is JobState.CLOSED and values["approved"]:
            # A ratio for a histogram, never money.
            self.preview_accuracy.labels(job).observe(values["committed"] / values["approved"])

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
