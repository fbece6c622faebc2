"""The ledger repository: the only code that holds SQL. One class, two engines (backends.py).

Synchronous by design: callers on an event loop use ``asyncio.to_thread``. Every method is one
transaction. See docs/ledger.md for the schema, the exactly-once guard and the queries.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from ecu_sidecar.ledger import burn
from ecu_sidecar.ledger.backends import Backend, Retry, Tx, backend_for_url
from ecu_sidecar.ledger.events import (
    MAX_VALUE,
    Event,
    Parsed,
    Rejected,
    parse_event,
    parse_events,
)
from ecu_sidecar.ledger.schema import MIGRATIONS, SCHEMA_MIGRATIONS_DDL, Migration
from ecu_sidecar.ledger.types import (
    AccountState,
    AutoTopup,
    Conservation,
    ConsumerRow,
    ConsumptionRow,
    Forecast,
    GrantConflict,
    GrantExpired,
    GrantLimit,
    GrantState,
    GrantStatus,
    HoldTotals,
    LedgerArgumentError,
    LedgerUnavailable,
    Notification,
    NotificationKind,
    QuarantinedEvent,
    SchemaAhead,
    SchemaBehind,
    SchemaModified,
    ScopeState,
    Snapshot,
    WriteResult,
)
from ecu_sidecar.model import (
    CommitOutcome,
    GrantKind,
    KnownHold,
    LedgerAccount,
    LedgerHold,
    LedgerReservation,
    Usage,
)
from ecu_sidecar.validation import CALLER_ID_MAX, ID_PATTERN, SCOPE_ID_MAX

__all__ = ["DAY_MS", "REPORT_DIMENSIONS", "Ledger", "open_ledger"]

DAY_MS = 86_400_000
#: Report dimension -> usage_entries column (a closed list: never interpolate caller text).
REPORT_DIMENSIONS = {
    "team": "team",
    "project": "project",
    "user": "user_id",
    "model": "model",
    "job_type": "job_type",
}
_PERIODS = ("day", "month")
#: A transaction that lost a deadlock or serialization race is run again this many times.
_ATTEMPTS = 5
#: Grants a Redis rebuild receives (so that a retried grant is still recognized as a replay).
_RECENT = 1_000
#: Event ids per IN list when looking up the fingerprints of duplicates.
_CHUNK = 500
#: Bulk inserts (Tx.insert): (column, kind).
_ORG_COLUMNS = (("org_id", "text"), ("created_at_ms", "bigint"))
_EVENT_COLUMNS = (
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


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def open_ledger(
    url: str,
    *,
    pool_size: int = 4,
    timeout_s: float = 10.0,
    statement_timeout_ms: int | None = None,
    clock: Callable[[], int] | None = None,
    migrations: Sequence[Migration] = MIGRATIONS,
) -> Ledger:
    """Open the ledger a URL names (postgresql://…, postgres://…, sqlite:///path, sqlite://:memory:).

    Nothing is checked or created: call ``migrate()`` (the migrate command) or
    ``check_schema()`` (start-up). ``timeout_s`` bounds waiting for a connection (PostgreSQL)
    or for the write lock (SQLite busy timeout); ``statement_timeout_ms`` cancels longer
    PostgreSQL statements (None: no limit). ``clock`` returns ms (tests freeze it).
    """
    backend = backend_for_url(
        url, pool_size=pool_size, timeout_s=timeout_s, statement_timeout_ms=statement_timeout_ms
    )
    return Ledger(backend, clock=clock, migrations=migrations)


class Ledger:
    """The durable ledger of ECU: events in, balances and reports out."""

    def __init__(
        self,
        backend: Backend,
        *,
        clock: Callable[[], int] | None = None,
        migrations: Sequence[Migration] = MIGRATIONS,
    ) -> None:
        versions = [m.version for m in migrations]
        if versions != list(range(1, len(versions) + 1)):
            raise ValueError(f"migration versions must be 1..n in order, got {versions}")
        self._db = backend
        self._clock = clock or _wall_clock_ms
        self._migrations = tuple(migrations)

    @property
    def dialect(self) -> str:
        """'postgresql' or 'sqlite'."""
        return self._db.dialect

    def close(self) -> None:
        """Close every connection."""
        self._db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ transactions

    def _write(self, fn: Callable[[Tx], Any]) -> Any:
        for attempt in range(_ATTEMPTS):
            try:
                with self._db.transaction(write=True) as tx:
                    return fn(tx)
            except Retry as exc:
                if attempt == _ATTEMPTS - 1:
                    raise LedgerUnavailable(
                        f"transaction lost {_ATTEMPTS} races in a row: {exc}"
                    ) from exc
        raise AssertionError("unreachable")

    def _read(self, fn: Callable[[Tx], Any]) -> Any:
        for attempt in range(_ATTEMPTS):
            try:
                with self._db.transaction(write=False) as tx:
                    return fn(tx)
            except Retry as exc:
                if attempt == _ATTEMPTS - 1:
                    raise LedgerUnavailable(str(exc)) from exc
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ schema

    def migrate(self) -> list[int]:
        """Apply the migrations the database lacks, in one transaction; return their versions.

        Idempotent, and safe when several processes run it at once (PostgreSQL: an advisory
        lock per schema; SQLite: BEGIN IMMEDIATE). Refuses a database that is ahead of the code.
        """

        def run(tx: Tx) -> list[int]:
            self._db.lock_migrations(tx)
            tx.run(SCHEMA_MIGRATIONS_DDL)
            applied = self._applied(tx)
            self._raise_if_ahead_or_modified(applied)
            done = []
            for m in self._migrations:
                if m.version in applied:
                    continue
                for statement in m.render(self.dialect):
                    tx.run(statement)
                tx.run(
                    "INSERT INTO schema_migrations (version, name, checksum, applied_at_ms) "
                    "VALUES (?, ?, ?, ?)",
                    (m.version, m.name, m.checksum(self.dialect), self._clock()),
                )
                done.append(m.version)
            return done

        return self._write(run)

    def check_schema(self) -> None:
        """Raise SchemaBehind / SchemaAhead / SchemaModified unless the database has exactly
        the migrations of this code (the start-up check)."""

        def run(tx: Tx) -> None:
            if not self._db.table_exists(tx, "schema_migrations"):
                raise SchemaBehind(
                    "the ledger database has no schema (no schema_migrations table): "
                    "run `ecu-sidecar migrate`",
                    versions=tuple(m.version for m in self._migrations),
                )
            applied = self._applied(tx)
            self._raise_if_ahead_or_modified(applied)
            missing = tuple(m.version for m in self._migrations if m.version not in applied)
            if missing:
                raise SchemaBehind(
                    f"the ledger schema is behind this code: migration(s) "
                    f"{', '.join(map(str, missing))} not applied (database at version "
                    f"{max(applied, default=0)}, code at {len(self._migrations)}): "
                    "run `ecu-sidecar migrate`",
                    versions=missing,
                )

        self._read(run)

    def schema_version(self) -> int:
        """The highest applied migration (0 when the database has no schema)."""

        def run(tx: Tx) -> int:
            if not self._db.table_exists(tx, "schema_migrations"):
                return 0
            return max(self._applied(tx), default=0)

        return self._read(run)

    def _applied(self, tx: Tx) -> dict[int, str]:
        return dict(tx.rows("SELECT version, checksum FROM schema_migrations"))

    def _raise_if_ahead_or_modified(self, applied: Mapping[int, str]) -> None:
        known = {m.version: m for m in self._migrations}
        ahead = tuple(sorted(v for v in applied if v not in known))
        if ahead:
            raise SchemaAhead(
                f"the ledger database has migration(s) {', '.join(map(str, ahead))} that this "
                f"code does not know (code at version {len(known)}): the code is older than "
                "the database; deploy the newer version",
                versions=ahead,
            )
        modified = tuple(
            sorted(v for v, c in applied.items() if known[v].checksum(self.dialect) != c)
        )
        if modified:
            raise SchemaModified(
                f"applied migration(s) {', '.join(map(str, modified))} differ from this code's "
                "text of them (checksum mismatch): a released migration was edited",
                versions=modified,
            )

    # ------------------------------------------------------------------ events

    @staticmethod
    def parse_events(events: Iterable[Mapping[Any, Any]]) -> Parsed:
        """Validate a batch for ``write_events``, without the database: a caller may do it
        while the previous batch is being written."""
        return parse_events(events)

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
            return self._write(lambda tx: self._apply(tx, parsed, rejected))
        except self._db.refusals:
            pass
        # The database refused a row that validation let through: find it by writing the
        # events one at a time (each still behind the guard), and quarantine the ones refused,
        # with the database's reason, so that one event cannot block its batch (and the
        # outbox) forever. A batch of one event is no exception: raising would hand the same
        # batch back to the flusher, which would retry it for ever.
        total = WriteResult(0, 0, 0)
        if rejected:
            total = self._write(lambda tx: self._apply(tx, [], rejected))
        for ev in parsed:
            try:
                result = self._write(lambda tx, ev=ev: self._apply(tx, [ev], []))
            except self._db.refusals as exc:
                reason = f"the database refused it: {type(exc).__name__}: {exc}"[:1000]
                result = self._write(
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
        now = self._clock()
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
            _ORG_COLUMNS,
            sorted(created.items()),
            conflict="ON CONFLICT (org_id) DO NOTHING",
        )
        rows = tx.insert(
            "events",
            _EVENT_COLUMNS,
            [
                (ev.org, ev.event_id, ev.type, ev.ts, now, ev.fingerprint, ev.payload)
                for ev in batch
            ],
            conflict="ON CONFLICT (org_id, event_id) DO NOTHING",
            returning="org_id, event_id",
        )
        fresh = {(r[0], r[1]) for r in rows}
        old = [ev for ev in batch if (ev.org, ev.event_id) not in fresh]
        stored = self._fingerprints(tx, old)
        for ev in old:
            fp = stored.get((ev.org, ev.event_id))
            if fp is None:  # recorded and removed by a concurrent writer's rejection: rerun
                raise Retry(f"event {ev.event_id} of {ev.org} vanished")
            if fp == ev.fingerprint or _same_meaning(_stored_payload(tx, ev), ev):
                duplicates += 1
            else:
                rejects.append(_reject(ev, "event id already recorded with different content"))

        effects = _Effects()
        applied: list[Event] = []
        for ev in batch:
            if (ev.org, ev.event_id) not in fresh:
                continue
            reason = _HANDLERS[ev.type](tx, ev, effects)
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

    def _fingerprints(self, tx: Tx, events: list[Event]) -> dict[tuple[str, str], str]:
        out: dict[tuple[str, str], str] = {}
        by_org: dict[str, list[str]] = {}
        for ev in events:
            by_org.setdefault(ev.org, []).append(ev.event_id)
        for org, ids in by_org.items():
            for i in range(0, len(ids), _CHUNK):
                part = ids[i : i + _CHUNK]
                for eid, fp in tx.rows(
                    "SELECT event_id, fingerprint FROM events WHERE org_id = ? AND event_id IN ("
                    + ", ".join(["?"] * len(part))
                    + ")",
                    [org, *part],
                ):
                    out[(org, eid)] = fp
        return out

    def quarantined(self, *, org: str | None = None, limit: int = 100) -> list[QuarantinedEvent]:
        """Refused events, oldest first."""
        where, params = ("WHERE org_id = ? ", [org]) if org is not None else ("", [])
        rows = self._read(
            lambda tx: tx.rows(
                "SELECT id, org_id, event_id, event_type, reason, payload, quarantined_at_ms "
                f"FROM quarantine {where}ORDER BY id LIMIT ?",
                [*params, _limit(limit)],
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
                "SELECT id, payload FROM quarantine ORDER BY id LIMIT ?", [_limit(limit)]
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

        return self._write(run)

    # ------------------------------------------------------------------ ledger-side writes

    def grant(
        self,
        org: str,
        grant_id: str,
        amount_uecu: int,
        kind: GrantKind | str,
        expires_at_ms: int | None = None,
        *,
        at_ms: int | None = None,
        now_ms: int | None = None,
        limit_uecu: int | None = None,
    ) -> bool:
        """Record a grant durably, as *pending*, before Redis sees it (the ledger-first path).

        A pending grant is not counted anywhere (totals, conservation, burn order, rebuild):
        its grant event, arriving from the outbox once Redis applied it, confirms it and counts
        it; ``void_grant`` marks it void when Redis refused it. Returns True when recorded now
        (or a void grant is pending again: Redis decides again), False when the same grant was
        already recorded pending or confirmed (a replay). The same id with another amount, kind
        or expiry raises GrantConflict. ``expires_at_ms`` None or 0: never expires.

        What Redis would refuse is refused here first, recording nothing, for a grant not
        recorded yet (or void): never for a replay, which Redis answers with its original
        outcome. ``now_ms``: raise GrantExpired when the expiry is not after it (pass Redis's
        clock). ``limit_uecu``: raise GrantLimit when the organization's confirmed grants plus
        its pending ones plus this one would exceed it (the limit Redis enforces on its
        granted total), checked under the organization's row lock.
        """
        _check_id("org", org, SCOPE_ID_MAX)
        _check_id("grant_id", grant_id, CALLER_ID_MAX)
        _check_int("amount_uecu", amount_uecu, low=1)
        kind = str(kind)
        if kind not in {k.value for k in GrantKind}:
            raise LedgerArgumentError(f"kind: expected one of {[k.value for k in GrantKind]}")
        if expires_at_ms is not None:
            _check_int("expires_at_ms", expires_at_ms)
        if limit_uecu is not None:
            _check_int("limit_uecu", limit_uecu)
        if now_ms is not None:
            _check_int("now_ms", now_ms)
        expires = expires_at_ms or None
        at = self._clock() if at_ms is None else at_ms

        def run(tx: Tx) -> bool:
            _ensure_org(tx, org, at)
            if not tx.rows(
                "INSERT INTO grants (org_id, grant_id, kind, amount_uecu, granted_at_ms, "
                "expires_at_ms, source, state) VALUES (?, ?, ?, ?, ?, ?, 'ledger', 'pending') "
                "ON CONFLICT (org_id, grant_id) DO NOTHING RETURNING grant_id",
                (org, grant_id, kind, amount_uecu, at, expires),
            ):
                amount, stored_kind, stored_expires, state = tx.rows(
                    "SELECT amount_uecu, kind, expires_at_ms, state FROM grants "
                    "WHERE org_id = ? AND grant_id = ?",
                    (org, grant_id),
                )[0]
                if (amount, stored_kind, stored_expires) != (amount_uecu, kind, expires):
                    raise GrantConflict(
                        f"grant_id {grant_id} of {org} was already recorded with amount "
                        f"{amount}, kind {stored_kind}, expires_at_ms {stored_expires or 0}",
                        grant_id=grant_id,
                    )
                if state != GrantStatus.VOID:
                    return False
                # Redis refused it before; the caller asks again: pending until Redis answers.
                tx.run(
                    "UPDATE grants SET state = 'pending', granted_at_ms = ? "
                    "WHERE org_id = ? AND grant_id = ? AND state = 'void'",
                    (at, org, grant_id),
                )
            # Raising rolls the transaction back: nothing of this grant is written.
            if now_ms is not None and expires is not None and expires <= now_ms:
                raise GrantExpired(
                    # Redis's words (grant.lua): the caller sees one error whoever refused.
                    f"grant {grant_id} expires at {expires} ms, which is not after now ({now_ms})",
                    expires_at=expires,
                )
            if limit_uecu is not None:
                _check_grant_limit(tx, org, limit_uecu)
            return True

        return self._write(run)

    def void_grant(self, org: str, grant_id: str) -> bool:
        """Mark a pending ledger-first grant void: Redis refused it (expired, balance limit,
        grant id used with other parameters), so it never counts. True when it was pending;
        False for a confirmed grant (Redis applied it: it stays), a void one, or an unknown id.
        A grant event arriving later for a void grant still confirms it (Redis is the truth
        of what was applied)."""
        _check_id("org", org, SCOPE_ID_MAX)
        _check_id("grant_id", grant_id, CALLER_ID_MAX)
        return bool(
            self._write(
                lambda tx: tx.run(
                    "UPDATE grants SET state = 'void' "
                    "WHERE org_id = ? AND grant_id = ? AND state = 'pending'",
                    (org, grant_id),
                )
            )
        )

    def record_snapshot(
        self,
        org: str,
        ledger_balance_uecu: int,
        redis_balance_uecu: int,
        *,
        at_ms: int | None = None,
    ) -> None:
        """Record one reconciliation measurement (drift = redis − ledger)."""
        _check_id("org", org, SCOPE_ID_MAX)
        _check_int("ledger_balance_uecu", ledger_balance_uecu, low=-MAX_VALUE)
        _check_int("redis_balance_uecu", redis_balance_uecu, low=-MAX_VALUE)
        at = self._clock() if at_ms is None else at_ms

        def run(tx: Tx) -> None:
            _ensure_org(tx, org, at)
            tx.run(
                "INSERT INTO balance_snapshots (org_id, taken_at_ms, ledger_balance_uecu, "
                "redis_balance_uecu, drift_uecu) VALUES (?, ?, ?, ?, ?)",
                (
                    org,
                    at,
                    ledger_balance_uecu,
                    redis_balance_uecu,
                    redis_balance_uecu - ledger_balance_uecu,
                ),
            )

        self._write(run)

    def snapshots(self, org: str, *, limit: int = 100) -> list[Snapshot]:
        """The latest snapshots of an organization, newest first."""
        rows = self._read(
            lambda tx: tx.rows(
                "SELECT taken_at_ms, ledger_balance_uecu, redis_balance_uecu "
                "FROM balance_snapshots WHERE org_id = ? ORDER BY taken_at_ms DESC, id DESC "
                "LIMIT ?",
                (org, _limit(limit)),
            )
        )
        return [Snapshot(org, r[0], r[1], r[2]) for r in rows]

    def add_notification(
        self,
        org: str,
        kind: NotificationKind | str,
        crossing_id: str | int,
        *,
        available_uecu: int,
        threshold_uecu: int | None = None,
        reference_uecu: int | None = None,
        topup_amount_uecu: int | None = None,
        at_ms: int | None = None,
    ) -> bool:
        """Write a notification once per (organization, kind, crossing id); True when new.

        The outbox's notify events land in the same table, with the event's ``generation``
        (or, without one, its event id) as the crossing id.
        """
        _check_id("org", org, SCOPE_ID_MAX)
        kind = str(kind)
        if kind not in {k.value for k in NotificationKind}:
            raise LedgerArgumentError(
                f"kind: expected one of {[k.value for k in NotificationKind]}, got {kind!r}"
            )
        crossing = str(crossing_id)
        if not crossing or len(crossing) > 256:
            raise LedgerArgumentError("crossing_id: expected 1-256 characters")
        _check_int("available_uecu", available_uecu, low=-MAX_VALUE)
        at = self._clock() if at_ms is None else at_ms

        def run(tx: Tx) -> bool:
            _ensure_org(tx, org, at)
            return _insert_notification(
                tx,
                org,
                kind,
                crossing,
                available_uecu,
                threshold_uecu,
                reference_uecu,
                topup_amount_uecu,
                at,
                None,
            )

        return self._write(run)

    def notifications(
        self, org: str, *, since_ms: int | None = None, limit: int = 1000
    ) -> list[Notification]:
        """An organization's notifications, oldest first."""
        rows = self._read(
            lambda tx: tx.rows(
                "SELECT kind, crossing_id, available_uecu, threshold_uecu, reference_uecu, "
                "topup_amount_uecu, created_at_ms, event_id FROM notifications "
                "WHERE org_id = ? AND created_at_ms >= ? "
                "ORDER BY created_at_ms, kind, crossing_id LIMIT ?",
                (org, since_ms if since_ms is not None else -MAX_VALUE, _limit(limit)),
            )
        )
        return [Notification(org, *r) for r in rows]

    def set_auto_topup(
        self, org: str, threshold_uecu: int | None, amount_uecu: int | None = None
    ) -> None:
        """Set an organization's auto-top-up (threshold and amount), or clear it with None."""
        _check_id("org", org, SCOPE_ID_MAX)
        if threshold_uecu is None:
            values: tuple[int | None, int | None] = (None, None)
        else:
            _check_int("threshold_uecu", threshold_uecu, low=1)
            if amount_uecu is None:
                raise LedgerArgumentError("amount_uecu: required with a threshold")
            _check_int("amount_uecu", amount_uecu, low=1)
            values = (threshold_uecu, amount_uecu)
        at = self._clock()

        def run(tx: Tx) -> None:
            _ensure_org(tx, org, at)
            _set_auto_topup(tx, org, *values, at, 0, "")

        self._write(run)

    def auto_topup(self, org: str) -> AutoTopup | None:
        """An organization's auto-top-up setting, or None."""
        rows = self._read(
            lambda tx: tx.rows(
                "SELECT auto_topup_threshold_uecu, auto_topup_amount_uecu FROM organizations "
                "WHERE org_id = ?",
                (org,),
            )
        )
        if not rows or rows[0][0] is None:
            return None
        return AutoTopup(rows[0][0], rows[0][1])

    # ------------------------------------------------------------------ reads

    def organizations(self) -> list[str]:
        """Every organization the ledger knows, sorted (for hydration and reconciliation)."""
        rows = self._read(lambda tx: tx.rows("SELECT org_id FROM organizations ORDER BY org_id"))
        return [r[0] for r in rows]

    def balance(self, org: str) -> int:
        """The ledger balance (granted − expired grants − committed); 0 for an unknown org."""
        rows = self._read(
            lambda tx: tx.rows("SELECT balance_uecu FROM organizations WHERE org_id = ?", (org,))
        )
        return rows[0][0] if rows else 0

    def account(self, org: str) -> AccountState | None:
        """Everything needed to rebuild one organization in Redis; None when unknown."""
        return self._read(lambda tx: self._account(tx, org))

    def _account(self, tx: Tx, org: str) -> AccountState | None:
        rows = tx.rows(
            "SELECT created_at_ms, last_event_at_ms, granted_uecu, expired_grants_uecu, "
            "committed_uecu, balance_uecu, auto_topup_threshold_uecu, auto_topup_amount_uecu "
            "FROM organizations WHERE org_id = ?",
            (org,),
        )
        if not rows:
            return None
        created, last, granted, expired, committed, balance, atu_t, atu_a = rows[0]
        grant_rows = tx.rows(
            "SELECT g.grant_id, g.kind, g.amount_uecu, g.granted_at_ms, g.expires_at_ms, "
            "x.amount_uecu, g.state FROM grants g LEFT JOIN grant_expiries x "
            "ON x.org_id = g.org_id AND x.grant_id = g.grant_id "
            "WHERE g.org_id = ? ORDER BY g.granted_at_ms, g.grant_id",
            (org,),
        )
        # Only what Redis applied burns: a pending or void grant never funded a commit.
        confirmed = [r for r in grant_rows if r[6] == GrantStatus.CONFIRMED]
        expiring = [
            burn.ExpiringGrant(r[0], r[3], r[4], r[2]) for r in confirmed if r[4] is not None
        ]
        bounds = burn.boundaries(expiring)
        sums = [
            int(
                tx.rows(
                    "SELECT COALESCE(SUM(amount_uecu), 0) FROM usage_entries "
                    "WHERE org_id = ? AND occurred_at_ms >= ? AND occurred_at_ms < ?",
                    (org, lo, hi),
                )[0][0]
            )
            for lo, hi in itertools.pairwise(bounds)
        ]
        rests = burn.replay(expiring, bounds, sums)
        grants = [
            GrantState(
                grant_id=r[0],
                kind=r[1],
                amount_uecu=r[2],
                granted_at_ms=r[3],
                expires_at_ms=r[4],
                expired_uecu=r[5],
                remaining_uecu=(
                    rests[r[0]]
                    if r[4] is not None and r[5] is None and r[6] == GrantStatus.CONFIRMED
                    else None
                ),
                state=GrantStatus(r[6]),
            )
            for r in grant_rows
        ]
        scopes: dict[tuple[str, str], list[Any]] = {}
        for scope, sid, cap in tx.rows(
            "SELECT scope, scope_id, cap_uecu FROM caps WHERE org_id = ?", (org,)
        ):
            scopes[(scope, sid)] = [cap, 0]
        for scope, column in (("team", "team"), ("project", "project")):
            for sid, used in tx.rows(
                f"SELECT {column}, SUM(amount_uecu) FROM usage_entries "
                f"WHERE org_id = ? AND {column} <> '' GROUP BY {column}",
                (org,),
            ):
                scopes.setdefault((scope, sid), [None, 0])[1] = int(used)
        h = tx.rows(
            "SELECT "
            "COALESCE(SUM(CASE WHEN kind = 'reserve' THEN amount_uecu ELSE 0 END), 0), "
            "COALESCE(SUM(CASE WHEN kind = 'release' THEN amount_uecu ELSE 0 END), 0), "
            "COALESCE(SUM(CASE WHEN kind = 'expire' THEN amount_uecu ELSE 0 END), 0), "
            "COALESCE(SUM(CASE WHEN kind = 'expire' THEN 1 ELSE 0 END), 0) "
            "FROM hold_events WHERE org_id = ?",
            (org,),
        )[0]
        c = tx.rows(
            "SELECT "
            "COALESCE(SUM(CASE WHEN late THEN 0 WHEN amount_uecu < hold_uecu THEN amount_uecu "
            "ELSE hold_uecu END), 0), "
            "COALESCE(SUM(released_uecu), 0), "
            "COALESCE(SUM(CASE WHEN late AND NOT orphan THEN amount_uecu ELSE 0 END), 0), "
            "COALESCE(SUM(CASE WHEN orphan THEN amount_uecu ELSE 0 END), 0), "
            "COALESCE(SUM(overage_uecu), 0), COALESCE(SUM(unbilled_uecu), 0) "
            "FROM usage_entries WHERE org_id = ?",
            (org,),
        )[0]
        h, c = [int(x) for x in h], [int(x) for x in c]
        return AccountState(
            organization=org,
            granted_uecu=granted,
            expired_grants_uecu=expired,
            committed_uecu=committed,
            balance_uecu=balance,
            generation=len(confirmed),
            grants=grants,
            scopes=[
                ScopeState(scope, sid, cap, used)
                for (scope, sid), (cap, used) in sorted(scopes.items())
            ],
            holds=HoldTotals(
                reserved_uecu=h[0],
                committed_from_holds_uecu=c[0],
                released_uecu=h[1] + c[1],
                expired_uecu=h[2],
                expired_holds=h[3],
                late_committed_uecu=c[2],
                orphan_committed_uecu=c[3],
                overage_uecu=c[4],
                unbilled_uecu=c[5],
            ),
            auto_topup=AutoTopup(atu_t, atu_a) if atu_t is not None else None,
            created_at_ms=created,
            last_event_at_ms=last,
        )

    def ledger_account(self, org: str) -> LedgerAccount | None:
        """The state a Redis rebuild of ``org`` takes (ecu_sidecar.model.LedgerAccount), or
        None when the ledger does not know the organization.

        The totals count confirmed grants only (Redis applied them). Pending grants (written
        ledger-first, no outbox event yet) are listed in ``unconfirmed_grants``: they reach
        Redis through the grant script (the caller's retry, or the flusher finishing them),
        whose event confirms them. Void grants (Redis refused them) are in neither.
        """

        def run(tx: Tx) -> tuple[AccountState, int, list[LedgerHold], list[Any]] | None:
            acct = self._account(tx, org)
            if acct is None:
                return None
            # generation counts confirmed grants only, as Redis's gen does
            generation = acct.generation
            return acct, generation, _outstanding_holds(tx, org), _notices(tx, org, generation)

        found = self._read(run)
        if found is None:
            return None
        acct, generation, holds, notices = found
        pending = [g for g in acct.grants if g.state == GrantStatus.PENDING]
        confirmed = [g for g in acct.grants if g.confirmed]
        latest = sorted(confirmed, key=lambda g: (g.granted_at_ms, g.grant_id))[-_RECENT:]
        references = [ref for _kind, ref in notices if ref is not None]
        return LedgerAccount(
            organization=org,
            granted_uecu=acct.granted_uecu,
            expired_grants_uecu=acct.expired_grants_uecu,
            committed_uecu=acct.committed_uecu,
            generation=generation,
            scopes=[(s.scope, s.scope_id, s.cap_uecu, s.used_uecu) for s in acct.scopes],
            expiring_grants=acct.expiring_grants,
            auto_topup_threshold_uecu=acct.auto_topup.threshold_uecu if acct.auto_topup else None,
            auto_topup_amount_uecu=acct.auto_topup.amount_uecu if acct.auto_topup else 0,
            recent_grants=[
                (g.grant_id, g.amount_uecu, g.kind, g.expires_at_ms or 0) for g in latest
            ],
            unconfirmed_grants=[
                (g.grant_id, g.amount_uecu, g.kind, g.expires_at_ms or 0) for g in pending
            ],
            active_holds=holds,
            notified=sorted({kind for kind, _ref in notices}),
            notice_reference_uecu=references[0] if references else None,
        )

    def reservation(self, org: str, reservation_id: str) -> LedgerReservation | None:
        """What the ledger recorded of a reservation id's latest hold, or None when it never
        saw one (ecu_sidecar.model.LedgerReservation). Its events share the hold's creation
        time t0: reserve:<rid>:<t0>, then commit:, release: or expire:<rid>:<t0>."""

        def run(tx: Tx) -> LedgerReservation | None:
            rows = tx.rows(
                "SELECT event_id, amount_uecu, team, project, user_id, job_type, model "
                "FROM hold_events WHERE org_id = ? AND reservation_id = ? AND kind = 'reserve' "
                "ORDER BY occurred_at_ms DESC, event_id DESC LIMIT 1",
                (org, reservation_id),
            )
            if not rows:
                # A hold degraded mode granted locally reached the ledger only as its commit.
                rows = tx.rows(
                    "SELECT event_id, hold_uecu, team, project, user_id, job_type, model "
                    "FROM usage_entries WHERE org_id = ? AND reservation_id = ? "
                    "ORDER BY occurred_at_ms DESC, event_id DESC LIMIT 1",
                    (org, reservation_id),
                )
            if not rows:
                return None
            event_id, amount, team, project, user, job, model = rows[0]
            t0 = int(event_id.rsplit(":", 1)[1])
            hold = KnownHold(int(amount), t0, "late", team, project, user, job, model)
            tail = f"{reservation_id}:{t0}"
            used = tx.rows(
                "SELECT actual_uecu, tokens_in, tokens_out, calls, amount_uecu, released_uecu, "
                "overage_uecu, unbilled_uecu, late FROM usage_entries "
                "WHERE org_id = ? AND event_id = ?",
                (org, f"commit:{tail}"),
            )
            if used:
                actual, t_in, t_out, calls, billed, released, overage, unbilled, late = used[0]
                outcome = CommitOutcome(
                    reservation_id,
                    committed_uecu=int(billed),
                    released_uecu=int(released),
                    overage_uecu=int(overage),
                    unbilled_overage_uecu=int(unbilled),
                    late=bool(late),
                    replayed=True,
                )
                usage = Usage(int(t_in), int(t_out), int(calls))
                return LedgerReservation(
                    reservation_id, "committed", hold, int(actual), usage, outcome
                )
            ended = tx.rows(
                "SELECT kind FROM hold_events WHERE org_id = ? AND event_id IN (?, ?)",
                (org, f"release:{tail}", f"expire:{tail}"),
            )
            kinds = {k for (k,) in ended}
            state = "released" if "release" in kinds else "expired" if kinds else "active"
            return LedgerReservation(reservation_id, state, hold)

        return self._read(run)

    #: The conservation query (docs/ledger.md): running totals against the sums of the
    #: entries they total, and the balance identity, for one organization, in one statement.
    CONSERVATION_SQL = """
        WITH t AS (
            SELECT o.granted_uecu AS granted,
                   o.expired_grants_uecu AS expired,
                   o.committed_uecu AS committed,
                   o.balance_uecu AS balance,
                   (SELECT COALESCE(SUM(g.amount_uecu), 0) FROM grants g
                     WHERE g.org_id = o.org_id AND g.state = 'confirmed') AS grants_sum,
                   (SELECT COALESCE(SUM(x.amount_uecu), 0) FROM grant_expiries x
                     WHERE x.org_id = o.org_id) AS expiries_sum,
                   (SELECT COALESCE(SUM(u.amount_uecu), 0) FROM usage_entries u
                     WHERE u.org_id = o.org_id) AS usage_sum
              FROM organizations o
             WHERE o.org_id = ?
        )
        SELECT granted, expired, committed, balance, grants_sum, expiries_sum, usage_sum,
               (granted - expired) - (committed + balance) AS balance_difference,
               usage_sum - committed AS usage_difference,
               grants_sum - granted AS grants_difference,
               expiries_sum - expired AS expiries_difference,
               CASE WHEN granted - expired = committed + balance
                         AND usage_sum = committed
                         AND grants_sum = granted
                         AND expiries_sum = expired
                    THEN 1 ELSE 0 END AS ok
          FROM t
    """

    def conservation(self, org: str) -> Conservation | None:
        """Run the conservation query for one organization; None when unknown."""
        rows = self._read(lambda tx: tx.rows(self.CONSERVATION_SQL, (org,)))
        if not rows:
            return None
        v = [int(x) for x in rows[0]]
        return Conservation(org, *v[:11], ok=bool(v[11]))

    def consumption(
        self,
        org: str,
        *,
        by: str | None = None,
        period: str = "day",
        start_ms: int | None = None,
        end_ms: int | None = None,
    ) -> list[ConsumptionRow]:
        """Billed usage per UTC day or month (and per key of ``by``), oldest first.

        ``by``: None, 'team', 'project', 'user', 'model' or 'job_type' ('job-type' too).
        The range is ``start_ms <= occurred_at < end_ms`` (either side open when None).
        """
        column = _dimension(by) if by is not None else None
        if period not in _PERIODS:
            raise LedgerArgumentError(f"period: expected day or month, got {period!r}")
        bucket = (
            f"(occurred_at_ms / {DAY_MS}) * {DAY_MS}"
            if period == "day"
            else self._db.month_start_ms("occurred_at_ms")
        )
        where, params = _range(org, start_ms, end_ms)
        key = f", {column}" if column else ""
        rows = self._read(
            lambda tx: tx.rows(
                f"SELECT {bucket} AS period_start{key}, SUM(amount_uecu), SUM(tokens_in), "
                f"SUM(tokens_out), SUM(calls), COUNT(*) FROM usage_entries {where} "
                f"GROUP BY 1{', 2' if column else ''} ORDER BY 1{', 2' if column else ''}",
                params,
            )
        )
        out = []
        for r in rows:
            if column:
                out.append(ConsumptionRow(int(r[0]), r[1], *(int(x) for x in r[2:])))
            else:
                out.append(ConsumptionRow(int(r[0]), "", *(int(x) for x in r[1:])))
        return out

    def top_consumers(
        self,
        org: str,
        *,
        by: str,
        limit: int = 10,
        start_ms: int | None = None,
        end_ms: int | None = None,
    ) -> list[ConsumerRow]:
        """The keys of ``by`` that were billed the most in the range, largest first."""
        column = _dimension(by)
        where, params = _range(org, start_ms, end_ms)
        rows = self._read(
            lambda tx: tx.rows(
                f"SELECT {column}, SUM(amount_uecu) AS amount, SUM(tokens_in), SUM(tokens_out), "
                f"SUM(calls), COUNT(*) FROM usage_entries {where} GROUP BY {column} "
                f"ORDER BY amount DESC, {column} LIMIT ?",
                [*params, _limit(limit)],
            )
        )
        return [ConsumerRow(r[0], *(int(x) for x in r[1:])) for r in rows]

    def forecast(self, org: str, *, trailing_days: int = 7, now_ms: int | None = None) -> Forecast:
        """When the ledger balance runs out at the billed rate of the trailing days.

        daily rate = billed in [now − days, now) // days; runs out at
        now + balance × day // rate (integer arithmetic).
        """
        _check_int("trailing_days", trailing_days, low=1)
        now = self._clock() if now_ms is None else now_ms
        start = now - trailing_days * DAY_MS

        def run(tx: Tx) -> tuple[int, int]:
            bal = tx.rows("SELECT balance_uecu FROM organizations WHERE org_id = ?", (org,))
            used = tx.rows(
                "SELECT COALESCE(SUM(amount_uecu), 0) FROM usage_entries "
                "WHERE org_id = ? AND occurred_at_ms >= ? AND occurred_at_ms < ?",
                (org, start, now),
            )[0][0]
            return (bal[0][0] if bal else 0), int(used)

        balance, used = self._read(run)
        rate = used // trailing_days
        if balance <= 0:
            runs_out: int | None = now
        elif rate == 0:
            runs_out = None
        else:
            runs_out = now + balance * DAY_MS // rate
        return Forecast(balance, rate, runs_out, start, now)


# ---------------------------------------------------------------------- event handlers


class _Effects:
    """What a batch adds up per organization, and the rows it inserts in bulk."""

    def __init__(self) -> None:
        self.totals: dict[str, list[int]] = {}  # org -> [granted, expired, committed]
        self.last: dict[str, int] = {}
        self.usage: list[tuple[Any, ...]] = []
        self.holds: list[tuple[Any, ...]] = []
        self.recon: list[tuple[Any, ...]] = []
        self.autotopup: dict[str, tuple[Any, ...]] = {}  # org -> newest (ts, seq, eid, t, a)

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
                _set_auto_topup(tx, org, threshold, amount, ts, seq, eid)

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
            for part in _chunks(sorted(tails)):
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


def _chunks(items: list[str]) -> Iterator[list[str]]:
    for i in range(0, len(items), _CHUNK):
        yield items[i : i + _CHUNK]


def _select_in(tx: Tx, sql: str, params: tuple[Any, ...], values: list[str]) -> set[str]:
    """The first column of ``sql`` (its IN list written as {}) over ``values``, in chunks."""
    out: set[str] = set()
    for part in _chunks(values):
        query = sql.format(", ".join(["?"] * len(part)))
        out.update(str(r[0]) for r in tx.rows(query, [*params, *part]))
    return out


def _check_grant_limit(tx: Tx, org: str, limit: int) -> None:
    """Raise GrantLimit (the transaction rolls back) when the organization's confirmed grants
    plus its pending ones (this one included) exceed ``limit``. The organization's row is
    locked first, so concurrent ledger-first grants of one organization are checked one after
    the other (a grants row, then the organization's: the order every writer takes)."""
    tx.run("UPDATE organizations SET granted_uecu = granted_uecu WHERE org_id = ?", (org,))
    total = tx.rows(
        "SELECT o.granted_uecu + (SELECT COALESCE(SUM(g.amount_uecu), 0) FROM grants g "
        "WHERE g.org_id = o.org_id AND g.state = 'pending') FROM organizations o "
        "WHERE o.org_id = ?",
        (org,),
    )[0][0]
    if int(total) > limit:
        raise GrantLimit(
            # Redis's words (grant.lua): the caller sees one error whoever refused.
            f"grant would take organization {org} past the {limit} uECU total an account may "
            "be granted",
            limit=limit,
        )


#: Holds the ledger records as outstanding: a reserve event with no release, expiry or commit
#: of the same reservation id and creation time. Every later event id of a hold is its kind,
#: then what follows 'reserve:' in its reserve event id ('<rid>:<t0>'), so each check is one
#: primary-key lookup; an extend adds ':<sequence>'. The reserve event's payload carries the
#: rate card version the hold was priced with.
_OUTSTANDING_HOLDS_SQL = """
    SELECT r.reservation_id, r.event_id, r.occurred_at_ms, r.amount_uecu, r.deadline_ms,
           r.team, r.project, r.user_id, r.job_type, r.model,
           (SELECT MAX(x.deadline_ms) FROM hold_events x
             WHERE x.org_id = r.org_id AND x.reservation_id = r.reservation_id
               AND x.kind = 'extend'
               AND substr(x.event_id, 1, length(r.event_id))
                   = 'extend:' || substr(r.event_id, 9) || ':'),
           (SELECT MAX(x.sequence) FROM hold_events x
             WHERE x.org_id = r.org_id AND x.reservation_id = r.reservation_id
               AND x.kind = 'extend'
               AND substr(x.event_id, 1, length(r.event_id))
                   = 'extend:' || substr(r.event_id, 9) || ':'),
           CAST(e.payload AS TEXT)
      FROM hold_events r
      JOIN events e ON e.org_id = r.org_id AND e.event_id = r.event_id
     WHERE r.org_id = ? AND r.kind = 'reserve'
       AND NOT EXISTS (
           SELECT 1 FROM hold_events t
            WHERE t.org_id = r.org_id
              AND t.event_id IN ('release:' || substr(r.event_id, 9),
                                 'expire:' || substr(r.event_id, 9)))
       AND NOT EXISTS (
           SELECT 1 FROM usage_entries u
            WHERE u.org_id = r.org_id AND u.event_id = 'commit:' || substr(r.event_id, 9))
     ORDER BY r.occurred_at_ms, r.event_id
"""


def _outstanding_holds(tx: Tx, org: str) -> list[LedgerHold]:
    """What a rebuild restores as ACTIVE holds (at most one per reservation id: the newest)."""
    found: dict[str, LedgerHold] = {}
    for row in tx.rows(_OUTSTANDING_HOLDS_SQL, (org,)):
        rid, eid, at, amount, deadline, team, project, user, job, model = row[:10]
        ext_deadline, ext_sequence, payload = row[10:]
        # t0 ends the reserve event id the scripts write; the event's time is the same.
        tail = eid.rsplit(":", 1)[-1]
        t0 = int(tail) if tail.isdigit() and len(tail) < 16 else int(at)
        fields = json.loads(payload) if payload else {}
        found.pop(rid, None)  # a newer hold of a reused id replaces the older, in time order
        found[rid] = LedgerHold(
            reservation_id=rid,
            amount_uecu=int(amount),
            t0_ms=t0,
            deadline_ms=max(int(deadline), int(ext_deadline or 0)),
            ttl_ms=max(0, int(deadline) - t0),
            sequence=int(ext_sequence or 0),
            team=team,
            project=project,
            user=user,
            job_type=job,
            model=model,
            rate_card_version=str(fields.get("rcv") or ""),
        )
    return list(found.values())


def _notices(tx: Tx, org: str, generation: int) -> list[tuple[str, int | None]]:
    """(kind, reference) of the notifications recorded for this generation (the crossing id
    the outbox's notify events carry)."""
    return [
        (kind, ref)
        for kind, ref in tx.rows(
            "SELECT kind, reference_uecu FROM notifications "
            "WHERE org_id = ? AND crossing_id = ? ORDER BY kind",
            (org, str(generation)),
        )
    ]


def _ensure_org(tx: Tx, org: str, at_ms: int) -> None:
    tx.run(
        "INSERT INTO organizations (org_id, created_at_ms) VALUES (?, ?) "
        "ON CONFLICT (org_id) DO NOTHING",
        (org, at_ms),
    )


def _insert_notification(
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
    return bool(
        tx.rows(
            "INSERT INTO notifications (org_id, kind, crossing_id, available_uecu, "
            "threshold_uecu, reference_uecu, topup_amount_uecu, created_at_ms, event_id) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (org_id, kind, crossing_id) DO NOTHING RETURNING kind",
            (org, kind, crossing, available, threshold, reference, amount, at_ms, event_id),
        )
    )


def _on_grant(tx: Tx, ev: Event, fx: _Effects) -> str | None:
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


def _on_grant_expire(tx: Tx, ev: Event, fx: _Effects) -> str | None:
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


def _on_commit(tx: Tx, ev: Event, fx: _Effects) -> str | None:
    v = ev.values
    fx.usage.append(
        (ev.org, ev.event_id, v["rid"], v["team"], v["project"], v["user"], v["model"], v["job"],
         v["tokens_in"], v["tokens_out"], v["calls"], v["committed"], v["actual"], v["amount"],
         v["released"], v["overage"], v["unbilled"], v["late"], v["orphan"], v["rcv"],
         v["lines"], ev.ts)
    )  # fmt: skip
    fx.add(ev.org, committed=v["committed"])
    return None


def _on_hold(tx: Tx, ev: Event, fx: _Effects) -> str | None:
    v = ev.values
    fx.holds.append(
        (ev.org, ev.event_id, v["rid"], ev.type, v.get("amount", 0), v.get("deadline"),
         v.get("sequence"), v.get("team", ""), v.get("project", ""), v.get("user", ""),
         v.get("job", ""), v.get("model", ""), ev.ts)
    )  # fmt: skip
    return None


def _on_cap(tx: Tx, ev: Event, fx: _Effects) -> str | None:
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


def _set_auto_topup(
    tx: Tx,
    org: str,
    threshold: int | None,
    amount: int | None,
    at_ms: int,
    seq: int,
    event_id: str,
) -> None:
    # The newest setting wins, whatever order batches land in: (time, counter, event id).
    tx.run(
        "UPDATE organizations SET auto_topup_threshold_uecu = ?, auto_topup_amount_uecu = ?, "
        "auto_topup_changed_at_ms = ?, auto_topup_change_seq = ?, auto_topup_event_id = ? "
        "WHERE org_id = ? AND (auto_topup_changed_at_ms IS NULL OR "
        "(?, ?, ?) >= (auto_topup_changed_at_ms, auto_topup_change_seq, auto_topup_event_id))",
        (threshold, amount, at_ms, seq, event_id, org, at_ms, seq, event_id),
    )


def _on_autotopup(tx: Tx, ev: Event, fx: _Effects) -> str | None:
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


def _on_notify(tx: Tx, ev: Event, fx: _Effects) -> str | None:
    v = ev.values
    crossing = str(v["generation"]) if v["generation"] is not None else ev.event_id
    _insert_notification(
        tx, ev.org, v["kind"], crossing, v["available"], v["threshold"], v["reference"],
        v["amount"], ev.ts, ev.event_id,
    )  # fmt: skip
    return None


def _on_reconciliation(tx: Tx, ev: Event, fx: _Effects) -> str | None:
    fx.recon.append((ev.org, ev.event_id, ev.type, json.dumps(ev.extra, sort_keys=True), ev.ts))
    return None


_HANDLERS: dict[str, Callable[[Tx, Event, _Effects], str | None]] = {
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
    "hydrate": _on_reconciliation,
    "repair": _on_reconciliation,
}


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


# ---------------------------------------------------------------------- argument checks


def _check_id(name: str, value: str, limit: int) -> None:
    if not isinstance(value, str) or not value or len(value) > limit:
        raise LedgerArgumentError(f"{name}: expected 1-{limit} characters, got {value!r}")
    if not ID_PATTERN.fullmatch(value):
        raise LedgerArgumentError(f"{name}: may contain only [A-Za-z0-9._-], got {value!r}")


def _check_int(name: str, value: int, *, low: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise LedgerArgumentError(f"{name}: expected an integer, got {type(value).__name__}")
    if not low <= value <= MAX_VALUE:
        raise LedgerArgumentError(f"{name}: must be between {low} and {MAX_VALUE}, got {value}")


def _limit(limit: int) -> int:
    _check_int("limit", limit, low=1)
    return limit


def _dimension(by: str) -> str:
    column = REPORT_DIMENSIONS.get(by.replace("-", "_") if isinstance(by, str) else by)
    if column is None:
        raise LedgerArgumentError(f"by: expected one of {', '.join(REPORT_DIMENSIONS)}, got {by!r}")
    return column


def _range(org: str, start_ms: int | None, end_ms: int | None) -> tuple[str, list[Any]]:
    where, params = "WHERE org_id = ?", [org]
    if start_ms is not None:
        _check_int("start_ms", start_ms)
        where += " AND occurred_at_ms >= ?"
        params.append(start_ms)
    if end_ms is not None:
        _check_int("end_ms", end_ms)
        where += " AND occurred_at_ms < ?"
        params.append(end_ms)
    return where, params
