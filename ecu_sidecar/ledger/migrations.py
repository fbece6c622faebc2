"""The schema: versioned migrations, one dialect-neutral set rendered for PostgreSQL or SQLite,
and ``Migrations``, which applies them and checks a database against them.

Each migration is a tuple of statements (never a script split on ';'). Three placeholders are
the only dialect differences in the DDL: ``{json}`` (JSONB | TEXT), ``{bool}`` (BOOLEAN |
INTEGER 0/1) and ``{id}`` (an identity primary key). A migration, once released, never
changes: its checksum is recorded in ``schema_migrations`` and checked at start-up. Add a new
one instead.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ecu_sidecar.ledger.backends import Tx
from ecu_sidecar.ledger.db import Database
from ecu_sidecar.ledger.types import SchemaAhead, SchemaBehind, SchemaModified

__all__ = ["MIGRATIONS", "Migration", "Migrations", "render"]

_TYPES = {
    "postgresql": {
        "json": "JSONB",
        "bool": "BOOLEAN",
        "id": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
    },
    "sqlite": {
        "json": "TEXT",
        "bool": "INTEGER",
        "id": "INTEGER PRIMARY KEY",
    },
}


@dataclass(frozen=True, slots=True)
class Migration:
    """One schema version: its number, a name, and its statements."""

    version: int
    name: str
    statements: tuple[str, ...]

    def render(self, dialect: str) -> tuple[str, ...]:
        """The statements for one dialect."""
        return render(self.statements, dialect)

    def checksum(self, dialect: str) -> str:
        """sha256 of the rendered statements (what schema_migrations records)."""
        text = "\n;\n".join(self.render(dialect))
        return hashlib.sha256(text.encode()).hexdigest()


def render(statements: tuple[str, ...], dialect: str) -> tuple[str, ...]:
    """Substitute the dialect's types into statements."""
    return tuple(s.format(**_TYPES[dialect]).strip() for s in statements)


SCHEMA_MIGRATIONS_DDL = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version       INTEGER PRIMARY KEY,
    name          TEXT NOT NULL,
    checksum      TEXT NOT NULL,
    applied_at_ms BIGINT NOT NULL
)"""

_V1 = (
    # One row per organization, with the running totals of the money ledger.
    # balance = granted - expired_grants - committed, kept as its own column so that the
    # conservation query checks the identity instead of assuming it.
    """
    CREATE TABLE organizations (
        org_id                    TEXT PRIMARY KEY,
        created_at_ms             BIGINT NOT NULL,
        last_event_at_ms          BIGINT,
        granted_uecu              BIGINT NOT NULL DEFAULT 0,
        expired_grants_uecu       BIGINT NOT NULL DEFAULT 0,
        committed_uecu            BIGINT NOT NULL DEFAULT 0,
        balance_uecu              BIGINT NOT NULL DEFAULT 0,
        auto_topup_threshold_uecu BIGINT,
        auto_topup_amount_uecu    BIGINT,
        auto_topup_changed_at_ms  BIGINT,
        auto_topup_change_seq     BIGINT NOT NULL DEFAULT 0,
        auto_topup_event_id       TEXT NOT NULL DEFAULT '',
        CHECK ((auto_topup_threshold_uecu IS NULL) = (auto_topup_amount_uecu IS NULL))
    )""",
    # Every outbox event ever applied: the exactly-once guard. Event ids are unique per
    # organization (a grant id or a reservation id is the caller's, within its organization).
    """
    CREATE TABLE events (
        org_id         TEXT NOT NULL REFERENCES organizations (org_id),
        event_id       TEXT NOT NULL,
        event_type     TEXT NOT NULL,
        occurred_at_ms BIGINT NOT NULL,
        recorded_at_ms BIGINT NOT NULL,
        fingerprint    TEXT NOT NULL,
        payload        {json} NOT NULL,
        PRIMARY KEY (org_id, event_id)
    )""",
    # Credits. expires_at_ms NULL = never. event_id NULL while written ledger-first only.
    """
    CREATE TABLE grants (
        org_id        TEXT NOT NULL REFERENCES organizations (org_id),
        grant_id      TEXT NOT NULL,
        kind          TEXT NOT NULL,
        amount_uecu   BIGINT NOT NULL CHECK (amount_uecu > 0),
        granted_at_ms BIGINT NOT NULL,
        expires_at_ms BIGINT,
        source        TEXT NOT NULL CHECK (source IN ('event', 'ledger')),
        event_id      TEXT,
        PRIMARY KEY (org_id, grant_id)
    )""",
    # The unspent rest of an expiring grant leaving the balance: at most once per grant. No
    # foreign key to grants: with several flushers an expiry may land before its grant.
    """
    CREATE TABLE grant_expiries (
        org_id        TEXT NOT NULL,
        grant_id      TEXT NOT NULL,
        amount_uecu   BIGINT NOT NULL CHECK (amount_uecu >= 0),
        expired_at_ms BIGINT NOT NULL,
        event_id      TEXT NOT NULL,
        PRIMARY KEY (org_id, grant_id),
        FOREIGN KEY (org_id, event_id) REFERENCES events (org_id, event_id)
    )""",
    # One row per commit: what was billed (amount_uecu) and the usage behind it.
    """
    CREATE TABLE usage_entries (
        org_id            TEXT NOT NULL,
        event_id          TEXT NOT NULL,
        reservation_id    TEXT NOT NULL,
        team              TEXT NOT NULL,
        project           TEXT NOT NULL,
        user_id           TEXT NOT NULL,
        model             TEXT NOT NULL,
        job_type          TEXT NOT NULL,
        tokens_in         BIGINT NOT NULL,
        tokens_out        BIGINT NOT NULL,
        calls             BIGINT NOT NULL,
        amount_uecu       BIGINT NOT NULL,
        actual_uecu       BIGINT NOT NULL,
        hold_uecu         BIGINT NOT NULL,
        released_uecu     BIGINT NOT NULL,
        overage_uecu      BIGINT NOT NULL,
        unbilled_uecu     BIGINT NOT NULL,
        late              {bool} NOT NULL,
        orphan            {bool} NOT NULL,
        rate_card_version TEXT,
        breakdown         {json},
        occurred_at_ms    BIGINT NOT NULL,
        PRIMARY KEY (org_id, event_id),
        FOREIGN KEY (org_id, event_id) REFERENCES events (org_id, event_id)
    )""",
    "CREATE INDEX usage_entries_by_time ON usage_entries (org_id, occurred_at_ms)",
    # Reserve, extend, release and expire of holds (commits are usage entries).
    """
    CREATE TABLE hold_events (
        org_id         TEXT NOT NULL,
        event_id       TEXT NOT NULL,
        reservation_id TEXT NOT NULL,
        kind           TEXT NOT NULL CHECK (kind IN ('reserve', 'extend', 'release', 'expire')),
        amount_uecu    BIGINT NOT NULL,
        deadline_ms    BIGINT,
        sequence       BIGINT,
        team           TEXT NOT NULL,
        project        TEXT NOT NULL,
        user_id        TEXT NOT NULL,
        job_type       TEXT NOT NULL,
        model          TEXT NOT NULL,
        occurred_at_ms BIGINT NOT NULL,
        PRIMARY KEY (org_id, event_id),
        FOREIGN KEY (org_id, event_id) REFERENCES events (org_id, event_id)
    )""",
    "CREATE INDEX hold_events_by_reservation ON hold_events (org_id, reservation_id)",
    # Current team/project caps (NULL = cleared); the newest change wins, whatever the order
    # in which batches land. Every change stays in events.payload.
    """
    CREATE TABLE caps (
        org_id        TEXT NOT NULL REFERENCES organizations (org_id),
        scope         TEXT NOT NULL CHECK (scope IN ('team', 'project')),
        scope_id      TEXT NOT NULL,
        cap_uecu      BIGINT,
        changed_at_ms BIGINT NOT NULL,
        change_seq    BIGINT NOT NULL,
        event_id      TEXT NOT NULL,
        PRIMARY KEY (org_id, scope, scope_id)
    )""",
    """
    CREATE TABLE balance_snapshots (
        id                  {id},
        org_id              TEXT NOT NULL REFERENCES organizations (org_id),
        taken_at_ms         BIGINT NOT NULL,
        ledger_balance_uecu BIGINT NOT NULL,
        redis_balance_uecu  BIGINT NOT NULL,
        drift_uecu          BIGINT NOT NULL
    )""",
    "CREATE INDEX balance_snapshots_by_time ON balance_snapshots (org_id, taken_at_ms)",
    # One row per (organization, kind, crossing): a crossing is written once, however often
    # it is reported.
    """
    CREATE TABLE notifications (
        org_id            TEXT NOT NULL REFERENCES organizations (org_id),
        kind              TEXT NOT NULL,
        crossing_id       TEXT NOT NULL,
        available_uecu    BIGINT NOT NULL,
        threshold_uecu    BIGINT,
        reference_uecu    BIGINT,
        topup_amount_uecu BIGINT,
        created_at_ms     BIGINT NOT NULL,
        event_id          TEXT,
        PRIMARY KEY (org_id, kind, crossing_id)
    )""",
    "CREATE INDEX notifications_by_time ON notifications (org_id, created_at_ms)",
    # Absolute values reconciliation wrote into Redis (hydrate, repair): audit only.
    """
    CREATE TABLE reconciliations (
        org_id         TEXT NOT NULL,
        event_id       TEXT NOT NULL,
        kind           TEXT NOT NULL,
        fields         {json} NOT NULL,
        occurred_at_ms BIGINT NOT NULL,
        PRIMARY KEY (org_id, event_id),
        FOREIGN KEY (org_id, event_id) REFERENCES events (org_id, event_id)
    )""",
    # Events refused by the writer, with the reason (dead letters). payload is the entry as
    # canonical ASCII JSON, lossless even for what PostgreSQL text could not hold.
    """
    CREATE TABLE quarantine (
        id                {id},
        org_id            TEXT NOT NULL,
        event_id          TEXT NOT NULL,
        event_type        TEXT NOT NULL,
        fingerprint       TEXT NOT NULL,
        reason            TEXT NOT NULL,
        payload           TEXT NOT NULL,
        quarantined_at_ms BIGINT NOT NULL,
        UNIQUE (org_id, event_id, fingerprint)
    )""",
)

_V2 = (
    # Two-phase ledger-first grants (docs/ledger.md, "Grants: ledger first"). A grant written
    # ledger-first is *pending* until its outbox event (Redis applied it) *confirms* it, or
    # *void* once Redis refused it. Only confirmed grants count in the totals.
    """
    ALTER TABLE grants ADD COLUMN state TEXT NOT NULL DEFAULT 'confirmed'
        CHECK (state IN ('pending', 'confirmed', 'void'))""",
    # Version 1 counted a ledger-first grant in the totals when it was written, before Redis
    # had applied it (or refused it): take those not confirmed yet out of the totals again.
    """
    UPDATE organizations
       SET granted_uecu = granted_uecu - (
               SELECT COALESCE(SUM(g.amount_uecu), 0) FROM grants g
                WHERE g.org_id = organizations.org_id
                  AND g.event_id IS NULL AND g.source = 'ledger'),
           balance_uecu = balance_uecu - (
               SELECT COALESCE(SUM(g.amount_uecu), 0) FROM grants g
                WHERE g.org_id = organizations.org_id
                  AND g.event_id IS NULL AND g.source = 'ledger')
     WHERE org_id IN (SELECT org_id FROM grants WHERE event_id IS NULL AND source = 'ledger')""",
    "UPDATE grants SET state = 'pending' WHERE event_id IS NULL AND source = 'ledger'",
)

#: Every migration, in version order. Versions are dense from 1.
_V3 = (
    # A commit Redis has no record of is settled by the ledger's record of that reservation
    # (Ledger.reservation): commits of holds degraded mode granted locally have no reserve
    # event, so their usage entry is found by reservation id.
    "CREATE INDEX usage_entries_by_reservation ON usage_entries (org_id, reservation_id)",
)

_V4 = (
    # Approved jobs (docs/jobs.md): every step's hold and commit rows carry their job id; a
    # step's reserve row what it drew from the wallet beyond the job's room, its commit row
    # what it billed from the job's money. A job's room is derived from them (ledger/jobs.py).
    "ALTER TABLE hold_events ADD COLUMN job_id TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE hold_events ADD COLUMN extra_uecu BIGINT NOT NULL DEFAULT 0",
    "ALTER TABLE usage_entries ADD COLUMN job_id TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE usage_entries ADD COLUMN job_uecu BIGINT NOT NULL DEFAULT 0",
    "CREATE INDEX hold_events_by_job ON hold_events (org_id, job_id) WHERE job_id <> ''",
    "CREATE INDEX usage_entries_by_job ON usage_entries (org_id, job_id) WHERE job_id <> ''",
    # One row per approved job, keyed by its open event (a job id may be reused once the
    # first job's record was purged). An end that lands before its open writes what it knows.
    """
    CREATE TABLE jobs (
        org_id                TEXT NOT NULL,
        job_id                TEXT NOT NULL,
        open_event_id         TEXT NOT NULL,
        opened_at_ms          BIGINT NOT NULL,
        job_type              TEXT NOT NULL,
        team                  TEXT NOT NULL,
        project               TEXT NOT NULL,
        user_id               TEXT,
        policy                TEXT,
        approved_uecu         BIGINT NOT NULL,
        extra_max_uecu        BIGINT,
        rate_card_version     TEXT,
        ttl_ms                BIGINT,
        state                 TEXT NOT NULL DEFAULT 'open'
                              CHECK (state IN ('open', 'closed', 'abandoned')),
        ended_at_ms           BIGINT,
        close_event_id        TEXT,
        returned_uecu         BIGINT,
        committed_at_end_uecu BIGINT,
        PRIMARY KEY (org_id, open_event_id)
    )""",
    "CREATE INDEX jobs_by_state ON jobs (org_id, state, job_type)",
)

# Open jobs across every organization, for the ecu_jobs_open gauge the flusher sets whenever
# it writes a job's open or end: a small index of the few open rows, not a scan of all jobs.
_V5 = ("CREATE INDEX jobs_open ON jobs (org_id) WHERE state = 'open'",)

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "initial ledger", _V1),
    Migration(2, "two-phase ledger-first grants", _V2),
    Migration(3, "usage entries by reservation", _V3),
    Migration(4, "approved jobs", _V4),
    Migration(5, "open jobs index", _V5),
)


class Migrations:
    """Applies a set of migrations to a database and checks a database against them."""

    def __init__(self, db: Database, migrations: Sequence[Migration] = MIGRATIONS) -> None:
        versions = [m.version for m in migrations]
        if versions != list(range(1, len(versions) + 1)):
            raise ValueError(f"migration versions must be 1..n in order, got {versions}")
        self._db = db
        self._migrations = tuple(migrations)

    def migrate(self) -> list[int]:
        """Apply the migrations the database lacks, in one transaction; return their versions.

        Idempotent, and safe when several processes run it at once (PostgreSQL: an advisory
        lock per schema; SQLite: BEGIN IMMEDIATE). Refuses a database that is ahead of the code.
        """
        dialect = self._db.dialect

        def run(tx: Tx) -> list[int]:
            self._db.backend.lock_migrations(tx)
            tx.run(SCHEMA_MIGRATIONS_DDL)
            applied = _applied(tx)
            self._raise_if_ahead_or_modified(applied)
            done = []
            for m in self._migrations:
                if m.version in applied:
                    continue
                for statement in m.render(dialect):
                    tx.run(statement)
                tx.run(
                    "INSERT INTO schema_migrations (version, name, checksum, applied_at_ms) "
                    "VALUES (?, ?, ?, ?)",
                    (m.version, m.name, m.checksum(dialect), self._db.clock()),
                )
                done.append(m.version)
            return done

        return self._db.write(run)

    def check_schema(self) -> None:
        """Raise SchemaBehind / SchemaAhead / SchemaModified unless the database has exactly
        the migrations of this code (the start-up check)."""

        def run(tx: Tx) -> None:
            if not self._db.backend.table_exists(tx, "schema_migrations"):
                raise SchemaBehind(
                    "the ledger database has no schema (no schema_migrations table): "
                    "run `ecu-sidecar migrate`",
                    versions=tuple(m.version for m in self._migrations),
                )
            applied = _applied(tx)
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

        self._db.read(run)

    def schema_version(self) -> int:
        """The highest applied migration (0 when the database has no schema)."""

        def run(tx: Tx) -> int:
            if not self._db.backend.table_exists(tx, "schema_migrations"):
                return 0
            return max(_applied(tx), default=0)

        return self._db.read(run)

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
        dialect = self._db.dialect
        modified = tuple(sorted(v for v, c in applied.items() if known[v].checksum(dialect) != c))
        if modified:
            raise SchemaModified(
                f"applied migration(s) {', '.join(map(str, modified))} differ from this code's "
                "text of them (checksum mismatch): a released migration was edited",
                versions=modified,
            )


def _applied(tx: Tx) -> dict[int, str]:
    return dict(tx.rows("SELECT version, checksum FROM schema_migrations"))
