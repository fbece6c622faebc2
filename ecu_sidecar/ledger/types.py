"""Value types and errors of the ledger repository. Every amount is an integer number of µECU,
every time an integer number of milliseconds since the Unix epoch (UTC)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ecu_sidecar.errors import BalanceLimit, GrantAlreadyExpired, IdempotencyConflict

if TYPE_CHECKING:
    from ecu_sidecar.ledger.events import Event

__all__ = [
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
    "LedgerArgumentError",
    "LedgerError",
    "LedgerUnavailable",
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
]


class LedgerError(Exception):
    """Root of every error the ledger repository raises."""


class LedgerArgumentError(LedgerError, ValueError):
    """A caller passed a malformed argument (organization id, report dimension, amount …)."""


class LedgerUnavailable(LedgerError):
    """The database cannot be reached or stayed locked past the timeout; retry later."""


class GrantConflict(LedgerError, IdempotencyConflict):
    """A grant id already recorded with a different amount, kind or expiry.

    Also an ``ecu_sidecar.errors.IdempotencyConflict``, so the gRPC edge maps it to
    ALREADY_EXISTS / IDEMPOTENCY_CONFLICT without a table entry of its own.
    """


class GrantExpired(LedgerError, GrantAlreadyExpired):
    """A ledger-first grant not recorded yet whose expiry is not after the caller's now (what
    Redis would refuse too). Also an ``ecu_sidecar.errors.GrantAlreadyExpired``."""


class GrantLimit(LedgerError, BalanceLimit):
    """A ledger-first grant would take the organization's confirmed plus pending grants past
    the largest total an account may be granted (what Redis would refuse too).

    Also an ``ecu_sidecar.errors.BalanceLimit`` (OUT_OF_RANGE / BALANCE_LIMIT at the edge).
    """


class SchemaError(LedgerError):
    """The database schema does not match the migrations this code knows."""

    def __init__(self, message: str, *, versions: tuple[int, ...]) -> None:
        super().__init__(message)
        self.versions = versions
        """The versions at fault (missing, unknown or modified)."""


class SchemaBehind(SchemaError):
    """Migrations of this code are not applied yet: run ``ecu-sidecar migrate``."""


class SchemaAhead(SchemaError):
    """The database has migrations this code does not know: it is older than the schema."""


class SchemaModified(SchemaError):
    """An applied migration's checksum differs from this code's text of it."""


class GrantStatus(enum.StrEnum):
    """Where a grant stands between the ledger and Redis (two-phase ledger-first grants)."""

    PENDING = "pending"
    """Written ledger-first; Redis has not applied it yet (or its event is not flushed)."""
    CONFIRMED = "confirmed"
    """Redis applied it (its outbox event arrived): counted in the totals."""
    VOID = "void"
    """Redis refused it (expired, balance limit, grant id used otherwise): never counted."""


class NotificationKind(enum.StrEnum):
    """What a notification announces; each is written once per crossing."""

    LOW_BALANCE_20 = "low_balance_20"
    LOW_BALANCE_5 = "low_balance_5"
    AUTO_TOPUP_REQUESTED = "auto_topup_requested"


@dataclass(frozen=True, slots=True)
class WriteResult:
    """What one ``write_events`` call did with its batch.

    ``inserted + duplicates + quarantined == len(batch)``.
    """

    inserted: int
    """Events whose (organization, event id) was recorded for the first time (and applied)."""
    duplicates: int
    """Events already recorded with identical content (a redelivery): no effect."""
    quarantined: int = 0
    """Events refused (malformed, unknown type, conflicting): kept in the quarantine table."""
    applied: tuple[Event, ...] = field(default=(), compare=False, repr=False)
    """The ``inserted`` events themselves, in batch order: what the flusher's money and
    notification counters count (a redelivered event is not counted twice)."""


@dataclass(frozen=True, slots=True)
class GrantState:
    """One grant of an organization as the ledger knows it."""

    grant_id: str
    kind: str
    amount_uecu: int
    granted_at_ms: int
    expires_at_ms: int | None
    """None: never expires."""
    expired_uecu: int | None
    """The unspent rest that left the balance when it expired; None while not expired."""
    remaining_uecu: int | None
    """Unspent rest of an expiring, not yet expired grant, by the burn order (soonest expiry
    first); None for never-expiring grants (they form one pool) and expired ones."""
    state: GrantStatus = GrantStatus.CONFIRMED
    """pending (written ledger-first, Redis has not confirmed it), confirmed (counted) or void
    (Redis refused it). Only confirmed grants count in the totals and the burn order."""

    @property
    def confirmed(self) -> bool:
        """Redis applied it: it counts in the totals."""
        return self.state == GrantStatus.CONFIRMED


@dataclass(frozen=True, slots=True)
class ScopeState:
    """A team or project: its cap (None when uncapped or cleared) and what it was billed."""

    scope: str
    """'team' or 'project'."""
    scope_id: str
    cap_uecu: int | None
    used_uecu: int


@dataclass(frozen=True, slots=True)
class HoldTotals:
    """Hold outcomes recorded in the ledger (reserve, release, expire, commits from holds)."""

    reserved_uecu: int
    committed_from_holds_uecu: int
    released_uecu: int
    """Released by a release call plus the unused rest of holds committed below their amount."""
    expired_uecu: int
    expired_holds: int
    late_committed_uecu: int
    orphan_committed_uecu: int
    overage_uecu: int
    unbilled_uecu: int

    @property
    def outstanding_uecu(self) -> int:
        """reserved − committed_from_holds − released − expired: holds not settled in the ledger
        (in flight, or lost with Redis and therefore released by definition)."""
        return (
            self.reserved_uecu
            - self.committed_from_holds_uecu
            - self.released_uecu
            - self.expired_uecu
        )


@dataclass(frozen=True, slots=True)
class AutoTopup:
    """An organization's auto-top-up setting."""

    threshold_uecu: int
    """When available falls below this, one auto_topup_requested notification is written."""
    amount_uecu: int
    """What the billing system should grant."""


@dataclass(frozen=True, slots=True)
class AccountState:
    """Everything the ledger knows of one organization (``Ledger.ledger_account`` condenses it
    into the ``ecu_sidecar.model.LedgerAccount`` a Redis rebuild takes)."""

    organization: str
    granted_uecu: int
    expired_grants_uecu: int
    committed_uecu: int
    """Billed usage: the sum of the commit events' ``committed``."""
    balance_uecu: int
    """granted − expired grants − committed (the running total, checked by conservation())."""
    generation: int
    """Number of confirmed grants so far (Redis numbers notification crossings with it)."""
    grants: list[GrantState]
    """Every grant the ledger holds, whatever its state (see GrantState.state)."""
    scopes: list[ScopeState]
    """Teams and projects with a cap or with usage, sorted by (scope, id)."""
    holds: HoldTotals
    auto_topup: AutoTopup | None
    created_at_ms: int
    last_event_at_ms: int | None
    """Redis time of the latest event applied; None when only ledger-side writes exist."""

    @property
    def expiring_grants(self) -> list[tuple[str, int, int]]:
        """(grant id, expiry ms, unspent rest) of every expiring, not yet expired grant with a
        rest above zero, in burn order: what Redis keeps in its grant-expiry index."""
        out = [
            (g.grant_id, g.expires_at_ms, g.remaining_uecu)
            for g in self.grants
            if g.expires_at_ms is not None and g.remaining_uecu
        ]
        return sorted(out, key=lambda t: (t[1], t[0]))


@dataclass(frozen=True, slots=True)
class Conservation:
    """The result of the conservation query for one organization (docs/ledger.md)."""

    organization: str
    granted_uecu: int
    expired_grants_uecu: int
    committed_uecu: int
    balance_uecu: int
    grants_sum_uecu: int
    """Sum of the grants table (must equal granted)."""
    expiries_sum_uecu: int
    """Sum of the grant_expiries table (must equal expired grants)."""
    usage_sum_uecu: int
    """Sum of the usage entries' billed amounts (must equal committed)."""
    balance_difference_uecu: int
    """(granted − expired) − (committed + balance): 0 when the running totals agree."""
    usage_difference_uecu: int
    """usage sum − committed."""
    grants_difference_uecu: int
    """grants sum − granted."""
    expiries_difference_uecu: int
    """expiries sum − expired grants."""
    ok: bool
    """Every difference is zero."""


@dataclass(frozen=True, slots=True)
class ConsumptionRow:
    """Billed usage of one period (and one key of the chosen dimension)."""

    period_start_ms: int
    """UTC midnight of the day, or of the first day of the month."""
    key: str
    """Team, project, user, model or job type; '' when not grouped (or unattributed)."""
    amount_uecu: int
    tokens_in: int
    tokens_out: int
    calls: int
    events: int
    """Number of commits."""


@dataclass(frozen=True, slots=True)
class ConsumerRow:
    """Billed usage of one key of a dimension over a time range."""

    key: str
    amount_uecu: int
    tokens_in: int
    tokens_out: int
    calls: int
    events: int


@dataclass(frozen=True, slots=True)
class Forecast:
    """When the ledger balance runs out at the trailing consumption rate."""

    balance_uecu: int
    daily_rate_uecu: int
    """Billed usage of the trailing window divided by its days (integer division)."""
    runs_out_at_ms: int | None
    """now + balance × day / rate (integer); now when the balance is already ≤ 0; None when
    nothing was consumed in the window."""
    window_start_ms: int
    window_end_ms: int


@dataclass(frozen=True, slots=True)
class Notification:
    """A threshold crossing or an auto-top-up request, written once per crossing."""

    organization: str
    kind: str
    crossing_id: str
    available_uecu: int
    threshold_uecu: int | None
    reference_uecu: int | None
    topup_amount_uecu: int | None
    created_at_ms: int
    event_id: str | None
    """The outbox event that carried it; None when written by add_notification directly."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One reconciliation measurement: the ledger balance against Redis's."""

    organization: str
    taken_at_ms: int
    ledger_balance_uecu: int
    redis_balance_uecu: int

    @property
    def drift_uecu(self) -> int:
        """redis − ledger."""
        return self.redis_balance_uecu - self.ledger_balance_uecu


@dataclass(frozen=True, slots=True)
class QuarantinedEvent:
    """An event the ledger refused, kept with the reason."""

    id: int
    organization: str
    event_id: str
    event_type: str
    reason: str
    fields: dict[str, str]
    quarantined_at_ms: int
