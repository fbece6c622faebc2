"""The store port: what the engine, the flusher, the server and the CLI call on the store, and
what the flusher's outbox reader offers. RedisStore (standalone, Cluster or embedded) is the one
implementation; code above the store depends on these protocols, not on it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from ecu_sidecar.jobs import JobApproval, JobView
from ecu_sidecar.model import (
    AccountRef,
    Balance,
    CommitBatchOutcome,
    CommitItem,
    ExtendOutcome,
    GrantKind,
    GrantOutcome,
    KnownHold,
    LedgerAccount,
    Reconciled,
    ReleaseOutcome,
    ReserveItem,
    ReserveOutcome,
    ScopeUsage,
    SweepOutcome,
)

if TYPE_CHECKING:
    from ecu_sidecar.metrics import StoreMetrics
    from ecu_sidecar.store.outbox import Backlog, OutboxEntry
    from ecu_sidecar.store.streams import StreamState

__all__ = ["Outbox", "Store"]


class Outbox(Protocol):
    """One flusher's consumer-group access to every organization's outbox stream. Each call is
    bounded (ECU_FLUSHER_REDIS_TIMEOUT_MS) and raises StoreUnavailable when Redis cannot
    serve."""

    consumer: str
    timeout_s: float

    async def discover(self) -> list[str]:
        """Organizations that have an outbox stream."""
        ...

    async def read(
        self, orgs: list[str], count: int | Mapping[str, int], *, own_pending: bool = False
    ) -> list[OutboxEntry]:
        """New entries (or, with ``own_pending``, this consumer's unacknowledged ones)."""
        ...

    async def claim(
        self,
        orgs: list[str],
        min_idle_ms: int,
        count: int | Mapping[str, int],
        start: Mapping[str, str] | None = None,
    ) -> tuple[list[OutboxEntry], dict[str, str]]:
        """Entries other consumers left pending for ``min_idle_ms``, and where each scan stopped."""
        ...

    async def ack(self, entries: list[OutboxEntry]) -> None:
        """Acknowledge and delete entries the ledger has committed."""
        ...

    async def state(self, org: str) -> StreamState:
        """The stream's last id and the ledger group's progress on it."""
        ...

    async def backlog(self, orgs: list[str], *, tidy: bool = False) -> Backlog:
        """What the outboxes hold that the ledger may not have yet."""
        ...

    async def forget_consumers(self, orgs: list[str], idle_ms: int) -> int:
        """Remove idle consumers with nothing pending (dead flushers); returns how many."""
        ...


class Store(Protocol):
    """The quota scripts (one round trip each) and the store's other calls. Every call raises
    StoreUnavailable when Redis is unreachable, silent or refusing (an unknown outcome: a retry
    with the same id settles it), and the domain error a script answers with otherwise."""

    kind: str
    """'embedded', 'standalone' or 'cluster'."""
    clock_offset_ms: int
    """Added to Redis TIME inside every script (tests step it; production leaves it at 0)."""
    metrics: StoreMetrics | None

    @property
    def key_prefix(self) -> str:
        """ECU_KEY_PREFIX."""
        ...

    def outbox(self, consumer: str) -> Outbox:
        """The outboxes as the flusher ``consumer`` reads them."""
        ...

    async def reserve(
        self,
        account: AccountRef,
        items: Sequence[ReserveItem],
        *,
        default_ttl_ms: int = 0,
        job_id: str = "",
    ) -> ReserveOutcome:
        """Hold every item against the account (or the approved job's room), all or nothing."""
        ...

    async def approve_job(
        self, account: AccountRef, approval: JobApproval, *, ttl_ms: int, overage_max_percent: int
    ) -> JobView:
        """Open a job holding its approved amount; a replay answers the job as it stands."""
        ...

    async def job(self, org: str, job_id: str, op: str = "get") -> JobView:
        """Get, touch (heartbeat) or close a job."""
        ...

    async def commit(
        self,
        org: str,
        items: Sequence[CommitItem],
        overage_max_percent: int,
        *,
        known: Mapping[str, KnownHold] | None = None,
    ) -> CommitBatchOutcome:
        """Settle each hold with its actual cost; items independent."""
        ...

    async def release(self, org: str, reservation_id: str) -> ReleaseOutcome:
        """Void a hold."""
        ...

    async def extend(
        self, org: str, reservation_id: str, ttl_ms: int, sequence: int
    ) -> ExtendOutcome:
        """Push a live hold's deadline forward."""
        ...

    async def grant(
        self, org: str, grant_id: str, amount_uecu: int, kind: GrantKind, expires_at_ms: int
    ) -> GrantOutcome:
        """Credit an organization (creating its account)."""
        ...

    async def set_cap(
        self, org: str, scope: str, scope_id: str, cap_uecu: int | None
    ) -> ScopeUsage:
        """Set or clear a team or project cap."""
        ...

    async def set_auto_topup(self, org: str, threshold_uecu: int | None, amount_uecu: int) -> None:
        """Configure (None: turn off) the organization's auto-top-up."""
        ...

    async def balance(self, org: str) -> Balance:
        """Sweep overdue holds, then read the organization's counters."""
        ...

    async def sweep(self, org: str) -> SweepOutcome:
        """Expire overdue holds and grants of one organization."""
        ...

    async def hydrate(
        self, account: LedgerAccount, *, flushed_id: str, force: bool = False
    ) -> bool:
        """Rebuild an organization from the ledger (once; whole)."""
        ...

    async def reconcile(
        self,
        org: str,
        flushed_id: str,
        ledger_balance_uecu: int,
        group: str,
        ledger_open_jobs: int | None = None,
    ) -> Reconciled:
        """Check an organization's keys and repair its balance to the ledger's."""
        ...

    async def epochs(self, orgs: Iterable[str]) -> dict[str, str]:
        """The epoch of the node holding each organization."""
        ...

    async def check_epoch(self, org: str, epoch: str, fence_ms: int) -> str | None:
        """None while the organization's keys are of the recorded history, else that epoch."""
        ...

    async def confirm_durable(self, orgs: Iterable[str]) -> None:
        """Wait until these organizations' writes reached ECU_REDIS_WAIT_REPLICAS replicas."""
        ...

    async def missing_accounts(self, orgs: Sequence[str]) -> list[str]:
        """The organizations among ``orgs`` that have no account in Redis."""
        ...

    async def outbox_state(self, org: str) -> StreamState:
        """Where the organization's outbox stands."""
        ...

    async def hold_totals(self, orgs: Sequence[str]) -> tuple[int, int]:
        """(active holds, µECU held) summed over ``orgs``."""
        ...

    async def bound_outboxes(self, orgs: Sequence[str], max_len: int) -> tuple[int, int]:
        """Trim unread outboxes to about ``max_len`` events: (left, trimmed)."""
        ...

    def acct_key(self, org: str) -> str:
        """The organization's account hash (for logs and tests)."""
        ...

    def outbox_key(self, org: str) -> str:
        """The organization's outbox stream."""
        ...

    async def now_ms(self) -> int:
        """The scripts' clock (Redis TIME plus ``clock_offset_ms``)."""
        ...

    async def connect(self) -> None:
        """Learn a Cluster's layout up front (a no-op elsewhere)."""
        ...

    async def ping(self) -> None:
        """Raise StoreUnavailable unless Redis answers within the bound."""
        ...

    async def close(self) -> None:
        """Close the store's connections."""
        ...
