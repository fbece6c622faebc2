"""The effects of each outbox event type: one handler per type, and the rows a batch inserts
in bulk (``Effects``). The writer (writer.py) calls ``HANDLERS[type]`` for every event it newly
recorded, in (organization, event id) order, then ``Effects.flush`` once per batch.

A handler returns None when the event is applied, or the reason it cannot be (the writer then
removes the event's row and quarantines it): a reason is never raised, so one event cannot
block its batch.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

from ecu_sidecar.ledger.backends import Tx
from ecu_sidecar.ledger.events import Event
from ecu_sidecar.ledger.jobs import flush_jobs, on_job_close, on_job_open
from ecu_sidecar.ledger.types import GrantStatus

__all__ = [
    "EVENT_COLUMNS",
    "HANDLERS",
    "ORG_COLUMNS",
    "Effects",
    "chunks",
    "insert_notification",
    "set_auto_topup",
]

#: Values per IN list.
CHUNK = 500

#: Bulk inserts (Tx.insert): (column, kind).
ORG_COLUMNS = (("org_id", "text"), ("created_at_ms", "bigint"))
EVENT_COLUMNS = (
    ("org_id", "text"),
    ("event_id", "text"),
    ("event_type", "text"),
    ("occurred_at_ms", "bigint"),
    ("recorded_at_ms", "bigint"),
    ("fingerprint", "text"),
    ("payload", "json"),
)
_USAGE_COLUMNS = (
    ("org_id", "text"),
    ("event_id", "text"),
    ("reservation_id", "text"),
    ("team", "text"),
    ("project", "text"),
    ("user_id", "text"),
    ("model", "text"),
    ("job_type", "text"),
    ("tokens_in", "bigint"),
    ("tokens_out", "bigint"),
    ("calls", "bigint"),
    ("amount_uecu", "bigint"),
    ("actual_uecu", "bigint"),
    ("hold_uecu", "bigint"),
    ("released_uecu", "bigint"),
    ("overage_uecu", "bigint"),
    ("unbilled_uecu", "bigint"),
    ("late", "bool"),
    ("orphan", "bool"),
    ("rate_card_version", "text"),
    ("breakdown", "json"),
    ("occurred_at_ms", "bigint"),
    ("job_id", "text"),
    ("job_uecu", "bigint"),
)
_HOLD_COLUMNS = (
    ("org_id", "text"),
    ("event_id", "text"),
    ("reservation_id", "text"),
    ("kind", "text"),
    ("amount_uecu", "bigint"),
    ("deadline_ms", "bigint"),
    ("sequence", "bigint"),
    ("team", "text"),
    ("project", "text"),
    ("user_id", "text"),
    ("job_type", "text"),
    ("model", "text"),
    ("occurred_at_ms", "bigint"),
    ("job_id", "text"),
    ("extra_uecu", "bigint"),
)
_RECON_COLUMNS = (
    ("org_id", "text"),
    ("event_id", "text"),
    ("kind", "text"),
    ("fields", "json"),
    ("occurred_at_ms", "bigint"),
)
_TOTALS_COLUMNS = (
    ("org_id", "text"),
    ("created_at_ms", "bigint"),
    ("granted_uecu", "bigint"),
    ("expired_grants_uecu", "bigint"),
    ("committed_uecu", "bigint"),
    ("balance_uecu", "bigint"),
    ("last_event_at_ms", "bigint"),
)
#: Adds a batch's totals to organizations that exist (the batch inserted them first): an
#: upsert is the bulk UPDATE both engines run as one statement, row by row in org order.
_ADD_TOTALS = (
    "ON CONFLICT (org_id) DO UPDATE SET "
    "granted_uecu = organizations.granted_uecu + excluded.granted_uecu, "
    "expired_grants_uecu = organizations.expired_grants_uecu + excluded.expired_grants_uecu, "
    "committed_uecu = organizations.committed_uecu + excluded.committed_uecu, "
    "balance_uecu = organizations.balance_uecu + excluded.balance_uecu, "
    "last_event_at_ms = CASE WHEN organizations.last_event_at_ms IS NULL "
    "OR organizations.last_event_at_ms < excluded.last_event_at_ms "
    "THEN excluded.last_event_at_ms ELSE organizations.last_event_at_ms END"
)


class Effects:
    """What a batch adds up per organization, and the rows it inserts in bulk."""

    def __init__(self) -> None:
        self.totals: dict[str, list[int]] = {}  # org -> [granted, expired, committed]
        self.last: dict[str, int] = {}
        self.usage: list[tuple[Any, ...]] = []
        self.holds: list[tuple[Any, ...]] = []
        self.recon: list[tuple[Any, ...]] = []
        self.autotopup: dict[str, tuple[Any, ...]] = {}  # org -> newest (ts, seq, eid, t, a)
        self.job_opens: list[tuple[Any, ...]] = []
        self.job_closes: list[tuple[Any, ...]] = []

    def add(self, org: str, granted: int = 0, expired: int = 0, committed: int = 0) -> None:
        t = self.totals.setdefault(org, [0, 0, 0])
        t[0] += granted
        t[1] += expired
        t[2] += committed

    def touch(self, org: str, ts: int) -> None:
        self.last[org] = max(self.last.get(org, ts), ts)

    def flush(self, tx: Tx) -> None:
        self._one_outcome_per_hold(tx)
        tx.insert("usage_entries", _USAGE_COLUMNS, self.usage)
        tx.insert("hold_events", _HOLD_COLUMNS, self.holds)
        tx.insert("reconciliations", _RECON_COLUMNS, self.recon)
        flush_jobs(tx, self.job_opens, self.job_closes)
        # Organization rows are locked last, in org order (concurrent writers wait, never
        # deadlock).
        totals = []
        for org in sorted(self.last):
            granted, expired, committed = self.totals.get(org, (0, 0, 0))
            last = self.last[org]
            totals.append(
                (org, last, granted, expired, committed, granted - expired - committed, last)
            )
        tx.insert("organizations", _TOTALS_COLUMNS, totals, conflict=_ADD_TOTALS)
        for org in sorted(self.autotopup):
            if org in self.last:
                ts, seq, eid, threshold, amount = self.autotopup[org]
                set_auto_topup(tx, org, threshold, amount, ts, seq, eid)

    def _one_outcome_per_hold(self, tx: Tx) -> None:
        """A hold ends once. A commit billed against an ACTIVE hold (not late) supersedes an
        expiry or release of the same hold, in whichever order they land: Redis emits both
        only when a failover (or restart) took one of them back out of its history, and the
        ledger keeps what the worker was told last, the commit. Superseded ends stay in
        ``events``; they leave ``hold_events``. A late commit follows its hold's expiry (both
        kept: that is what late means)."""
        committed: dict[str, set[str]] = {}  # org -> tails ('<rid>:<t0>') of commits, not late
        for row in self.usage:
            if not row[_USAGE_LATE]:
                committed.setdefault(row[0], set()).add(row[1].partition(":")[2])
        ended: dict[str, set[str]] = {}  # org -> tails of this batch's expiries and releases
        for row in self.holds:
            if row[3] in _ENDS:
                ended.setdefault(row[0], set()).add(row[1].partition(":")[2])
        superseded: set[tuple[str, str]] = set()
        for org, tails in ended.items():
            earlier = _select_in(
                tx,
                "SELECT event_id FROM usage_entries WHERE org_id = ? AND late = ? "
                "AND event_id IN ({})",
                (org, False),
                [f"commit:{t}" for t in sorted(tails)],
            )
            mine = committed.get(org, set())
            superseded.update((org, t) for t in tails if t in mine or f"commit:{t}" in earlier)
        if superseded:
            self.holds = [
                r
                for r in self.holds
                if not (r[3] in _ENDS and (r[0], r[1].partition(":")[2]) in superseded)
            ]
        for org, tails in committed.items():
            for part in chunks(sorted(tails)):
                ids = [f"{kind}:{t}" for t in part for kind in sorted(_ENDS)]
                tx.run(
                    "DELETE FROM hold_events WHERE org_id = ? AND event_id IN ("
                    + ", ".join(["?"] * len(ids))
                    + ")",
                    [org, *ids],
                )


#: Hold events that end a hold without billing it.
_ENDS = frozenset({"expire", "release"})
#: The position of ``late`` in a usage_entries row.
_USAGE_LATE = [name for name, _ in _USAGE_COLUMNS].index("late")


def chunks(items: list[str]) -> Iterator[list[str]]:
    """``items`` in lists of at most CHUNK (the values of one IN list)."""
    for i in range(0, len(items), CHUNK):
        yield items[i : i + CHUNK]


def _select_in(tx: Tx, sql: str, params: tuple[Any, ...], values: list[str]) -> set[str]:
    """The first column of ``sql`` (its IN list written as {}) over ``values``, in chunks."""
    out: set[str] = set()
    for part in chunks(values):
        query = sql.format(", ".join(["?"] * len(part)))
        out.update(str(r[0]) for r in tx.rows(query, [*params, *part]))
    return out


def insert_notification(
    tx: Tx,
    org: str,
    kind: str,
    crossing: str,
    available: int,
    threshold: int | None,
    reference: int | None,
    amount: int | None,
    at_ms: int,
    event_id: str | None,
) -> bool:
    """Write a notification once per (organization, kind, crossing id); True when new."""
    return bool(
        tx.rows(
            "INSERT INTO notifications (org_id, kind, crossing_id, available_uecu, "
            "threshold_uecu, reference_uecu, topup_amount_uecu, created_at_ms, event_id) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (org_id, kind, crossing_id) DO NOTHING RETURNING kind",
            (org, kind, crossing, available, threshold, reference, amount, at_ms, event_id),
        )
    )


def _on_grant(tx: Tx, ev: Event, fx: Effects) -> str | None:
    v = ev.values
    expires = v["expires_at"] or None
    if tx.rows(
        "INSERT INTO grants (org_id, grant_id, kind, amount_uecu, granted_at_ms, expires_at_ms, "
        "source, event_id, state) VALUES (?, ?, ?, ?, ?, ?, 'event', ?, 'confirmed') "
        "ON CONFLICT (org_id, grant_id) DO NOTHING RETURNING grant_id",
        (ev.org, v["grant_id"], v["kind"], v["amount"], ev.ts, expires, ev.event_id),
    ):
        fx.add(ev.org, granted=v["amount"])
        return None
    amount, kind, stored_expires, state = tx.rows(
        "SELECT amount_uecu, kind, expires_at_ms, state FROM grants "
        "WHERE org_id = ? AND grant_id = ?",
        (ev.org, v["grant_id"]),
    )[0]
    if state == GrantStatus.CONFIRMED:
        if (amount, kind, stored_expires) != (v["amount"], v["kind"], expires):
            return (
                f"grant {v['grant_id']} already recorded with amount {amount}, kind {kind}, "
                f"expires_at {stored_expires or 0}"
            )
        return None
    # Written ledger-first (pending), or void (Redis refused that request): Redis applied this
    # grant, and Redis is the truth of what was applied. Confirm it with the event's
    # parameters and Redis's time (which the burn-order replay follows), and count it now.
    tx.run(
        "UPDATE grants SET state = 'confirmed', event_id = ?, granted_at_ms = ?, "
        "amount_uecu = ?, kind = ?, expires_at_ms = ? WHERE org_id = ? AND grant_id = ?",
        (ev.event_id, ev.ts, v["amount"], v["kind"], expires, ev.org, v["grant_id"]),
    )
    fx.add(ev.org, granted=v["amount"])
    return None


def _on_grant_expire(tx: Tx, ev: Event, fx: Effects) -> str | None:
    gid, rest = ev.values["grant_id"], ev.values["amount"]
    rows = tx.rows(
        "SELECT amount_uecu, expires_at_ms FROM grants "
        "WHERE org_id = ? AND grant_id = ? AND state = 'confirmed'",
        (ev.org, gid),
    )
    # Several flushers may apply an org's events out of order: an expiry whose grant is not
    # recorded yet (or only ledger-first: its parameters are the caller's, not yet what Redis
    # applied) is applied all the same (the ledger is the same in any order); one that
    # contradicts a confirmed grant is refused.
    if rows:
        amount, expires = rows[0]
        if expires is None:
            return f"grant_expire of grant {gid}, which never expires"
        if rest > amount:
            return f"grant_expire rest {rest} exceeds grant {gid}'s amount {amount}"
    if tx.rows(
        "INSERT INTO grant_expiries (org_id, grant_id, amount_uecu, expired_at_ms, event_id) "
        "VALUES (?, ?, ?, ?, ?) ON CONFLICT (org_id, grant_id) DO NOTHING RETURNING grant_id",
        (ev.org, gid, rest, ev.ts, ev.event_id),
    ):
        fx.add(ev.org, expired=rest)
        return None
    stored = tx.rows(
        "SELECT amount_uecu FROM grant_expiries WHERE org_id = ? AND grant_id = ?", (ev.org, gid)
    )[0][0]
    if stored != rest:
        return f"grant {gid} already expired with rest {stored}"
    return None


def _on_commit(tx: Tx, ev: Event, fx: Effects) -> str | None:
    v = ev.values
    fx.usage.append(
        (ev.org, ev.event_id, v["rid"], v["team"], v["project"], v["user"], v["model"], v["job"],
         v["tokens_in"], v["tokens_out"], v["calls"], v["committed"], v["actual"], v["amount"],
         v["released"], v["overage"], v["unbilled"], v["late"], v["orphan"], v["rcv"],
         v["lines"], ev.ts, v["job_id"] or "", v["job_uecu"] or 0)
    )  # fmt: skip
    fx.add(ev.org, committed=v["committed"])
    return None


def _on_hold(tx: Tx, ev: Event, fx: Effects) -> str | None:
    v = ev.values
    fx.holds.append(
        (ev.org, ev.event_id, v["rid"], ev.type, v.get("amount", 0), v.get("deadline"),
         v.get("sequence"), v.get("team", ""), v.get("project", ""), v.get("user", ""),
         v.get("job", ""), v.get("model", ""), ev.ts, v.get("job_id") or "",
         v.get("extra") or 0)
    )  # fmt: skip
    return None


def _on_cap(tx: Tx, ev: Event, fx: Effects) -> str | None:
    v = ev.values
    seq = _event_seq(ev.event_id)
    # The newest change wins, whatever order batches land in: (time, counter, event id).
    tx.run(
        "INSERT INTO caps (org_id, scope, scope_id, cap_uecu, changed_at_ms, change_seq, "
        "event_id) VALUES (?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (org_id, scope, scope_id) DO UPDATE SET cap_uecu = excluded.cap_uecu, "
        "changed_at_ms = excluded.changed_at_ms, change_seq = excluded.change_seq, "
        "event_id = excluded.event_id "
        "WHERE (excluded.changed_at_ms, excluded.change_seq, excluded.event_id) "
        "> (caps.changed_at_ms, caps.change_seq, caps.event_id)",
        (ev.org, v["scope"], v["scope_id"], v["cap"], ev.ts, seq, ev.event_id),
    )
    return None


def set_auto_topup(
    tx: Tx,
    org: str,
    threshold: int | None,
    amount: int | None,
    at_ms: int,
    seq: int,
    event_id: str,
) -> None:
    """Set an organization's auto-top-up unless a newer change is recorded."""
    # The newest setting wins, whatever order batches land in: (time, counter, event id).
    tx.run(
        "UPDATE organizations SET auto_topup_threshold_uecu = ?, auto_topup_amount_uecu = ?, "
        "auto_topup_changed_at_ms = ?, auto_topup_change_seq = ?, auto_topup_event_id = ? "
        "WHERE org_id = ? AND (auto_topup_changed_at_ms IS NULL OR "
        "(?, ?, ?) >= (auto_topup_changed_at_ms, auto_topup_change_seq, auto_topup_event_id))",
        (threshold, amount, at_ms, seq, event_id, org, at_ms, seq, event_id),
    )


def _on_autotopup(tx: Tx, ev: Event, fx: Effects) -> str | None:
    threshold = ev.values["threshold"] or None  # '' (or 0): off
    amount = ev.values["amount"] if threshold is not None else None
    change = (ev.ts, _event_seq(ev.event_id), ev.event_id, threshold, amount)
    # Applied with the totals, at the end: the organization row is locked last, in org order.
    fx.autotopup[ev.org] = max(fx.autotopup.get(ev.org, change), change, key=lambda c: c[:3])
    return None


def _event_seq(event_id: str) -> int:
    """The counter the scripts end some event ids with (cap, autotopup changes), else 0."""
    tail = event_id.rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() and len(tail) < 16 else 0


def _on_notify(tx: Tx, ev: Event, fx: Effects) -> str | None:
    v = ev.values
    crossing = str(v["generation"]) if v["generation"] is not None else ev.event_id
    insert_notification(
        tx, ev.org, v["kind"], crossing, v["available"], v["threshold"], v["reference"],
        v["amount"], ev.ts, ev.event_id,
    )  # fmt: skip
    return None


def _on_reconciliation(tx: Tx, ev: Event, fx: Effects) -> str | None:
    fx.recon.append((ev.org, ev.event_id, ev.type, json.dumps(ev.extra, sort_keys=True), ev.ts))
    return None


HANDLERS: dict[str, Callable[[Tx, Event, Effects], str | None]] = {
    "grant": _on_grant,
    "grant_expire": _on_grant_expire,
    "commit": _on_commit,
    "reserve": _on_hold,
    "extend": _on_hold,
    "release": _on_hold,
    "expire": _on_hold,
    "cap": _on_cap,
    "notify": _on_notify,
    "autotopup": _on_autotopup,
    "job_open": lambda tx, ev, fx: on_job_open(tx, ev, fx.job_opens),
    "job_close": lambda tx, ev, fx: on_job_close(tx, ev, fx.job_closes),
    "hydrate": _on_reconciliation,
    "repair": _on_reconciliation,
}
