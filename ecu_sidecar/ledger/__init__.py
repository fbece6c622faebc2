"""The durable ledger of ECU: the only package that holds SQL.

``open_ledger(url)`` returns a ``Ledger`` on PostgreSQL (``postgresql://…``) or SQLite
(``sqlite:///path/to/ledger.db``, ``sqlite://:memory:``). See docs/ledger.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ecu_sidecar.ledger.events import SPECS as EVENT_SPECS
from ecu_sidecar.ledger.migrations import MIGRATIONS, Migration
from ecu_sidecar.ledger.repository import DAY_MS, REPORT_DIMENSIONS, Ledger, open_ledger
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
    LedgerError,
    LedgerUnavailable,
    Notification,
    NotificationKind,
    QuarantinedEvent,
    SchemaAhead,
    SchemaBehind,
    SchemaError,
    SchemaModified,
    ScopeState,
    Snapshot,
    WriteResult,
)

if TYPE_CHECKING:
    from ecu_sidecar.settings import Settings

__all__ = [
    "DAY_MS",
    "EVENT_SPECS",
    "MIGRATIONS",
    "REPORT_DIMENSIONS",
    "AccountState",
    "AutoTopup",
    "Conservation",
    "ConsumerRow",
    "ConsumptionRow",
    "Forecast",
    "GrantConflict",
    "GrantExpired",
    "GrantLimit",
    "GrantState",
    "GrantStatus",
    "HoldTotals",
    "Ledger",
    "LedgerArgumentError",
    "LedgerError",
    "LedgerUnavailable",
    "Migration",
    "Notification",
    "NotificationKind",
    "QuarantinedEvent",
    "SchemaAhead",
    "SchemaBehind",
    "SchemaError",
    "SchemaModified",
    "ScopeState",
    "Snapshot",
    "WriteResult",
    "open_configured",
    "open_ledger",
]


def open_configured(settings: Settings, *, check: bool = True, bounded: bool = False) -> Ledger:
    """Open ECU_LEDGER_URL. With ``check``, verify its schema is current (start-up check); on
    the embedded default with a SQLite ledger, apply pending migrations instead, so the
    no-install set-up needs no separate migrate step. With ``bounded`` (the sidecar, whose
    requests wait on it), waiting for a connection, connecting, the SQLite write lock and each
    PostgreSQL statement are bounded by ECU_LEDGER_TIMEOUT_MS, so a thread blocked on an
    unreachable ledger comes back about when its caller gave up on it."""
    if bounded:
        ledger = open_ledger(
            settings.ledger_url,
            timeout_s=settings.ledger_timeout_ms / 1000,
            statement_timeout_ms=settings.ledger_timeout_ms,
        )
    else:
        ledger = open_ledger(settings.ledger_url)
    if not check:
        return ledger
    try:
        if settings.embedded and ledger.dialect == "sqlite":
            ledger.migrate()
        ledger.check_schema()
    except BaseException:
        ledger.close()
        raise
    return ledger
