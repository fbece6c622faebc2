"""The event writer: outbox events into the ledger, each at most once, ever.

Every event's (organization, event id) is inserted into ``events`` with ON CONFLICT DO NOTHING,
and only the events whose row was newly inserted have effects (handlers.py), in the same
transaction. A redelivery is a duplicate; what cannot be applied is quarantined with its
reason, never raised. See docs/ledger.md, "Exactly once".
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from ecu_sidecar.ledger.backends import Retry, Tx
from ecu_sidecar.ledger.db import Database, check_limit
from ecu_sidecar.ledger.events import Event, Parsed, Rejected, parse_event, parse_events
from ecu_sidecar.ledger.handlers import EVENT_COLUMNS, HANDLERS, ORG_COLUMNS, Effects, chunks
from ecu_sidecar.ledger.types import QuarantinedEvent, WriteResult

__all__ = ["EventWriter"]


class EventWriter:
    """Writes batches of outbox events, and keeps the quarantine of those it refused."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def write_events(self, events: Iterable[Mapping[Any, Any]] | Parsed) -> WriteResult:
        """Record a batch of outbox events in ONE transaction, each at most once, ever.

        Every event's (organization, event id) is inserted into ``events`` with ON CONFLICT DO
        NOTHING; only the events whose row was newly inserted have effects, in the same
        transaction. A redelivered event (same id, same content) is a duplicate; a malformed
        one, an unknown type, or an id reused with different content is quarantined with the
        reason and counted, never raised, so it cannot block the batch. ``events`` are the
        entries, or what ``parse_events`` made of them.
        """
        batch = events if isinstance(events, Parsed) else parse_events(events)
        parsed, rejected = list(batch.events), list(batch.rejected)
        if not parsed and not rejected:
            return WriteResult(0, 0, 0)
        try:
            return self._db.write(lambda tx: self._apply(tx, parsed, rejected))
        except self._db.backend.refusals:
            pass
        # The database refused a row that validation let through: find it by writing the
        # events one at a time (each still behind the guard), and quarantine the ones refused,
        # with the database's reason, so that one event cannot block its batch (and the
        # outbox) forever. A batch of one event is no exception: raising would hand the same
        # batch back to the flusher, which would retry it for ever.
        total = WriteResult(0, 0, 0)
        if rejected:
            total = self._db.write(lambda tx: self._apply(tx, [], rejected))
        for ev in parsed:
            try:
                result = self._db.write(lambda tx, ev=ev: self._apply(tx, [ev], []))
            except self._db.backend.refusals as exc:
                reason = f"the database refused it: {type(exc).__name__}: {exc}"[:1000]
                result = self._db.write(
                    lambda tx, ev=ev, r=reason: self._apply(tx, [], [_reject(ev, r)])
                )
            total = WriteResult(
                total.inserted + result.inserted,
                total.duplicates + result.duplicates,
                total.quarantined + result.quarantined,
                total.applied + result.applied,
            )
        return total

    def _apply(self, tx: Tx, parsed: list[Event], rejected: list[Rejected]) -> WriteResult:
        now = self._db.clock()
        rejects = list(rejected)
        duplicates = 0
        first: dict[tuple[str, str], Event] = {}
        for ev in parsed:
            seen = first.setdefault((ev.org, ev.event_id), ev)
            if seen is not ev:
                if seen.fingerprint == ev.fingerprint or _same_meaning(seen.payload, ev):
                    duplicates += 1
                else:
                    rejects.append(_reject(ev, "event id repeated in the batch with other content"))
        # One global order (organization, event id) for every lock this transaction takes, so
        # that concurrent writers of overlapping batches wait for each other, never deadlock.
        batch = sorted(first.values(), key=lambda e: (e.org, e.event_id))
        created: dict[str, int] = {}
        for ev in batch:
            created[ev.org] = min(created.get(ev.org, ev.ts), ev.ts)
        tx.insert(
            "organizations",
            ORG_COLUMNS,
            sorted(created.items()),
            conflict="ON CONFLICT (org_id) DO NOTHING",
        )
        rows = tx.insert(
            "events",
            EVENT_COLUMNS,
            [
                (ev.org, ev.event_id, ev.type, ev.ts, now, ev.fingerprint, ev.payload)
                for ev in batch
            ],
            conflict="ON CONFLICT (org_id, event_id) DO NOTHING",
            returning="org_id, event_id",
        )
        fresh = {(r[0], r[1]) for r in rows}
        old = [ev for ev in batch if (ev.org, ev.event_id) not in fresh]
        stored = _fingerprints(tx, old)
        for ev in old:
            fp = stored.get((ev.org, ev.event_id))
            if fp is None:  # recorded and removed by a concurrent writer's rejection: rerun
                raise Retry(f"event {ev.event_id} of {ev.org} vanished")
            if fp == ev.fingerprint or _same_meaning(_stored_payload(tx, ev), ev):
                duplicates += 1
            else:
                rejects.append(_reject(ev, "event id already recorded with different content"))

        effects = Effects()
        applied: list[Event] = []
        for ev in batch:
            if (ev.org, ev.event_id) not in fresh:
                continue
            reason = HANDLERS[ev.type](tx, ev, effects)
            if reason is not None:
                tx.run(
                    "DELETE FROM events WHERE org_id = ? AND event_id = ?", (ev.org, ev.event_id)
                )
                rejects.append(_reject(ev, reason))
                continue
            applied.append(ev)
            effects.touch(ev.org, ev.ts)
        effects.flush(tx)
        tx.many(
            "INSERT INTO quarantine (org_id, event_id, event_type, fingerprint, reason, payload, "
            "quarantined_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (org_id, event_id, fingerprint) DO NOTHING",
            [(r.org, r.event_id, r.type, r.fingerprint, r.reason, r.payload, now) for r in rejects],
        )
        return WriteResult(len(applied), duplicates, len(rejects), tuple(applied))

    def quarantined(self, *, org: str | None = None, limit: int = 100) -> list[QuarantinedEvent]:
        """Refused events, oldest first."""
        where, params = ("WHERE org_id = ? ", [org]) if org is not None else ("", [])
        rows = self._db.read(
            lambda tx: tx.rows(
                "SELECT id, org_id, event_id, event_type, reason, payload, quarantined_at_ms "
                f"FROM quarantine {where}ORDER BY id LIMIT ?",
                [*params, check_limit(limit)],
            )
        )
        return [
            QuarantinedEvent(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), r[6]) for r in rows
        ]

    def retry_quarantined(self, *, limit: int = 1000) -> WriteResult:
        """Run up to ``limit`` quarantined events through the writer again (after an upgrade
        taught it a new event type, or a fix): those that apply leave the quarantine, the others
        stay (with the current reason). One transaction."""

        def run(tx: Tx) -> WriteResult:
            rows = tx.rows(
                "SELECT id, payload FROM quarantine ORDER BY id LIMIT ?", [check_limit(limit)]
            )
            if not rows:
                return WriteResult(0, 0, 0)
            ids = [r[0] for r in rows]
            tx.run(f"DELETE FROM quarantine WHERE id IN ({', '.join(['?'] * len(ids))})", ids)
            parsed: list[Event] = []
            rejected: list[Rejected] = []
            for r in rows:
                result = parse_event(json.loads(r[1]))
                (parsed if isinstance(result, Event) else rejected).append(result)
            return self._apply(tx, parsed, rejected)

        return self._db.write(run)


#: Event types whose content carries no money: the same id emitted again (after a failover
#: took the first emission back out of Redis) is the same notice or extension, whatever the
#: balance or clock said the second time; the first recorded stands.
_MONEYLESS = frozenset({"notify", "extend"})


def _same_meaning(recorded: str, ev: Event) -> bool:
    """Whether an event id recorded with the payload ``recorded`` and emitted again as ``ev``
    (other content) is the same change: a moneyless type, or every field equal but the time.
    Redis emits one change again only when it lost the first emission (a failover to a
    lagging replica, a restart): the replay is a duplicate, not a conflict to quarantine."""
    if ev.type in _MONEYLESS:
        return True
    first, again = json.loads(recorded), json.loads(ev.payload)
    first.pop("ts", None)
    again.pop("ts", None)
    return bool(first == again)


def _stored_payload(tx: Tx, ev: Event) -> str:
    return str(
        tx.rows(
            "SELECT CAST(payload AS TEXT) FROM events WHERE org_id = ? AND event_id = ?",
            (ev.org, ev.event_id),
        )[0][0]
    )


def _reject(ev: Event, reason: str) -> Rejected:
    return Rejected(ev.org, ev.event_id, ev.type, ev.fingerprint, ev.payload, reason)


def _fingerprints(tx: Tx, events: list[Event]) -> dict[tuple[str, str], str]:
    """The recorded fingerprint of each of ``events`` (by organization and event id)."""
    out: dict[tuple[str, str], str] = {}
    by_org: dict[str, list[str]] = {}
    for ev in events:
        by_org.setdefault(ev.org, []).append(ev.event_id)
    for org, ids in by_org.items():
        for part in chunks(ids):
            for eid, fp in tx.rows(
                "SELECT event_id, fingerprint FROM events WHERE org_id = ? AND event_id IN ("
                + ", ".join(["?"] * len(part))
                + ")",
                [org, *part],
            ):
                out[(org, eid)] = fp
    return out
