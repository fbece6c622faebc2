"""What the flusher needs of the ledger (ecu_sidecar.ledger implements it)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from ecu_sidecar.model import LedgerAccount, LedgerBalance

__all__ = ["FlusherLedger"]


class FlusherLedger(Protocol):
    """The ledger as the flusher writes events into it and reconciles against it."""

    def parse_events(self, events: Sequence[dict[str, str]]) -> Any:
        """Validate entries' fields into what write_events takes."""
        ...

    def write_events(self, events: Any) -> Any:
        """Write entries (their fields), or what parse_events made of them."""
        ...

    def ledger_account(self, org: str) -> LedgerAccount | None:
        """The organization as the ledger knows it (what a rebuild writes back to Redis)."""
        ...

    def balances(self, orgs: list[str]) -> dict[str, LedgerBalance]:
        """What reconciliation compares of each known organization, read in bulk."""
        ...

    def void_grant(self, org: str, grant_id: str) -> bool:
        """Drop a pending ledger-first grant Redis refuses for good."""
        ...

    def organizations(self, after: str = "", limit: int | None = None) -> list[str]:
        """The organizations the ledger knows, sorted: every one, or a page of ``limit``
        whose ids sort after ``after``."""
        ...

    def open_jobs(self) -> int:
        """How many approved jobs are open across every organization."""
        ...

    def record_snapshot(self, org: str, ledger_balance: int, redis_balance: int) -> None:
        """Record a reconciliation's comparison."""
        ...

    def prune_snapshots(self, older_than_ms: int, *, limit: int) -> int:
        """Delete at most ``limit`` snapshots older than ``older_than_ms``."""
        ...
