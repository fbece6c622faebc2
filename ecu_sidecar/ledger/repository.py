"""The ledger repository: ``Ledger``, the one object callers hold, over five parts that each own
one concern (docs/ledger.md):

- migrations.py: the schema, applying it (``migrate``) and checking it (``check_schema``);
- writer.py (with handlers.py): outbox events in, each at most once, and the quarantine;
- records.py: what callers record directly (ledger-first grants, notifications, auto-top-up,
  reconciliation snapshots);
- accounts.py (with burn.py): an organization's state, as a Redis rebuild and the engine read it;
- reports.py: conservation, consumption, top consumers, forecasts.

Every method is one delegation. Synchronous by design: callers on an event loop use
``asyncio.to_thread``. Every call is one transaction (db.py), on PostgreSQL or SQLite
(backends.py, which holds every difference between the two).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from ecu_sidecar.ledger.accounts import Accounts
from ecu_sidecar.ledger.backends import Backend, backend_for_url
from ecu_sidecar.ledger.db import Database
from ecu_sidecar.ledger.events import Parsed, parse_events
from ecu_sidecar.ledger.migrations import MIGRATIONS, Migration, Migrations
from ecu_sidecar.ledger.records import Records
from ecu_sidecar.ledger.reports import DAY_MS, REPORT_DIMENSIONS, Reports
from ecu_sidecar.ledger.types import (
    AccountState,
    AutoTopup,
    Conservation,
    ConsumerRow,
    ConsumptionRow,
    Forecast,
    Notification,
    NotificationKind,
    QuarantinedEvent,
    Snapshot,
    WriteResult,
)
from ecu_sidecar.ledger.writer import EventWriter
from ecu_sidecar.model import GrantKind, LedgerAccount, LedgerBalance, LedgerReservation

__all__ = ["DAY_MS", "REPORT_DIMENSIONS", "Ledger", "open_ledger"]


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
        db = Database(backend, clock)
        self.backend = backend
        """The connections (backends.py): tests read tables through its transactions."""
        self._migrations = Migrations(db, migrations)
        self._writer = EventWriter(db)
        self._records = Records(db)
        self._accounts = Accounts(db)
        self._reports = Reports(db)

    @property
    def dialect(self) -> str:
        """'postgresql' or 'sqlite'."""
        return self.backend.dialect

    def close(self) -> None:
        """Close every connection."""
        self.backend.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the schema (migrations.py)

    def migrate(self) -> list[int]:
        """Apply the migrations the database lacks; return their versions (Migrations.migrate)."""
        return self._migrations.migrate()

    def check_schema(self) -> None:
        """Raise a SchemaError unless the database has exactly this code's migrations."""
        self._migrations.check_schema()

    def schema_version(self) -> int:
        """The highest applied migration (0 when the database has no schema)."""
        return self._migrations.schema_version()

    # -- outbox events (writer.py)

    @staticmethod
    def parse_events(events: Iterable[Mapping[Any, Any]]) -> Parsed:
        """Validate a batch for ``write_events``, without the database: a caller may do it
        while the previous batch is being written."""
        return parse_events(events)

    def write_events(self, events: Iterable[Mapping[Any, Any]] | Parsed) -> WriteResult:
        """Record a batch of outbox events in one transaction, each at most once, ever
        (EventWriter.write_events)."""
        return self._writer.write_events(events)

    def quarantined(self, *, org: str | None = None, limit: int = 100) -> list[QuarantinedEvent]:
        """Refused events, oldest first."""
        return self._writer.quarantined(org=org, limit=limit)

    def retry_quarantined(self, *, limit: int = 1000) -> WriteResult:
        """Run up to ``limit`` quarantined events through the writer again."""
        return self._writer.retry_quarantined(limit=limit)

    # -- direct records (records.py)

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
        """Record a grant durably, as pending, before Redis sees it (Records.grant)."""
        return self._records.grant(
            org,
            grant_id,
            amount_uecu,
            kind,
            expires_at_ms,
            at_ms=at_ms,
            now_ms=now_ms,
            limit_uecu=limit_uecu,
        )

    def void_grant(self, org: str, grant_id: str) -> bool:
        """Mark a pending ledger-first grant void: Redis refused it (Records.void_grant)."""
        return self._records.void_grant(org, grant_id)

    def record_snapshot(
        self,
        org: str,
        ledger_balance_uecu: int,
        redis_balance_uecu: int,
        *,
        at_ms: int | None = None,
    ) -> None:
        """Record one reconciliation measurement (drift = redis − ledger)."""
        self._records.record_snapshot(org, ledger_balance_uecu, redis_balance_uecu, at_ms=at_ms)

    def prune_snapshots(self, older_than_ms: int, *, limit: int) -> int:
        """Delete at most ``limit`` balance snapshots older than ``older_than_ms``, oldest
        written first; how many went."""
        return self._records.prune_snapshots(older_than_ms, limit=limit)

    def snapshots(self, org: str, *, limit: int = 100) -> list[Snapshot]:
        """The latest snapshots of an organization, newest first."""
        return self._records.snapshots(org, limit=limit)

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
        """Write a notification once per (organization, kind, crossing id); True when new."""
        return self._records.add_notification(
            org,
            kind,
            crossing_id,
            available_uecu=available_uecu,
            threshold_uecu=threshold_uecu,
            reference_uecu=reference_uecu,
            topup_amount_uecu=topup_amount_uecu,
            at_ms=at_ms,
        )

    def notifications(
        self, org: str, *, since_ms: int | None = None, limit: int = 1000
    ) -> list[Notification]:
        """An organization's notifications, oldest first."""
        return self._records.notifications(org, since_ms=since_ms, limit=limit)

    def set_auto_topup(
        self, org: str, threshold_uecu: int | None, amount_uecu: int | None = None
    ) -> None:
        """Set an organization's auto-top-up (threshold and amount), or clear it with None."""
        self._records.set_auto_topup(org, threshold_uecu, amount_uecu)

    def auto_topup(self, org: str) -> AutoTopup | None:
        """An organization's auto-top-up setting, or None."""
        return self._records.auto_topup(org)

    # -- accounts (accounts.py)

    def organizations(self, after: str = "", limit: int | None = None) -> list[str]:
        """The organizations the ledger knows, sorted (for hydration and reconciliation):
        every one, or a page of ``limit`` after ``after``."""
        return self._accounts.organizations(after, limit)

    def open_jobs(self) -> int:
        """How many approved jobs are open across every organization."""
        return self._accounts.open_jobs()

    def balance(self, org: str) -> int:
        """The ledger balance (granted − expired grants − committed); 0 for an unknown org."""
        return self._accounts.balance(org)

    def account(self, org: str) -> AccountState | None:
        """Everything needed to rebuild one organization in Redis; None when unknown."""
        return self._accounts.account(org)

    def balances(self, orgs: list[str]) -> dict[str, LedgerBalance]:
        """Each known organization's ledger balance and whether pending grants wait, read in
        bulk for reconciliation (equal to what ``ledger_account`` reports)."""
        return self._accounts.balances(orgs)

    def ledger_account(self, org: str) -> LedgerAccount | None:
        """The state a Redis rebuild of ``org`` takes, or None (Accounts.ledger_account)."""
        return self._accounts.ledger_account(org)

    def reservation(self, org: str, reservation_id: str) -> LedgerReservation | None:
        """What the ledger recorded of a reservation id's latest hold, or None."""
        return self._accounts.reservation(org, reservation_id)

    # -- reports (reports.py)

    def conservation(self, org: str) -> Conservation | None:
        """Run the conservation query for one organization; None when unknown."""
        return self._reports.conservation(org)

    def consumption(
        self,
        org: str,
        *,
        by: str | None = None,
        period: str = "day",
        start_ms: int | None = None,
        end_ms: int | None = None,
    ) -> list[ConsumptionRow]:
        """Billed usage per UTC day or month (and per key of ``by``), oldest first."""
        return self._reports.consumption(
            org, by=by, period=period, start_ms=start_ms, end_ms=end_ms
        )

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
        return self._reports.top_consumers(
            org, by=by, limit=limit, start_ms=start_ms, end_ms=end_ms
        )

    def forecast(self, org: str, *, trailing_days: int = 7, now_ms: int | None = None) -> Forecast:
        """When the ledger balance runs out at the billed rate of the trailing days."""
        return self._reports.forecast(org, trailing_days=trailing_days, now_ms=now_ms)
