"""Ledger-first grants: with a ledger, money enters it before Redis applies it.

A grant is written to the ledger first, as a *pending* grant counted nowhere until Redis's
grant event confirms it; once the ledger holds it, it cannot be lost. A grant Redis definitely
refuses is voided there; one whose outcome is unknown (UNAVAILABLE) stays pending for the
caller's retry with the same id or for the flusher, which finishes pending grants once the
outbox is flushed.
"""

from __future__ import annotations

import logging
from typing import Protocol

from ecu_sidecar.engine.hydrator import Hydrator, LedgerReader
from ecu_sidecar.errors import (
    BalanceLimit,
    GrantAlreadyExpired,
    IdempotencyConflict,
    StoreUnavailable,
)
from ecu_sidecar.model import MAX_GRANTED_UECU, GrantKind, GrantOutcome
from ecu_sidecar.store import Store

__all__ = ["GrantLedger", "grant_ledger_first"]

log = logging.getLogger(__name__)


class GrantLedger(LedgerReader, Protocol):
    """What the engine needs of the ledger repository (ecu_sidecar.ledger): durable two-phase
    grants, and the state to rebuild an organization from (LedgerReader). Blocking; an
    unreachable database raises ecu_sidecar.ledger.LedgerUnavailable."""

    def grant(
        self,
        org: str,
        grant_id: str,
        amount_uecu: int,
        kind: str,
        expires_at_ms: int,
        *,
        now_ms: int | None = None,
        limit_uecu: int | None = None,
    ) -> bool: ...

    def void_grant(self, org: str, grant_id: str) -> bool: ...


async def grant_ledger_first(
    store: Store,
    ledger: GrantLedger,
    hydrator: Hydrator,
    org: str,
    grant_id: str,
    amount_uecu: int,
    kind: GrantKind,
    expires_at_ms: int,
) -> GrantOutcome:
    """Credit ``org`` through the ledger first (a pending grant), then Redis (a validated
    request; the engine checks it)."""
    # An organization Redis lost is rebuilt first (from what Redis had confirmed), so this
    # grant lands on its real balance. What Redis would refuse the ledger refuses first, in its
    # transaction, before anything is written (and never for a replay, which Redis answers as
    # the original): an expiry not after now by the scripts' clock (Redis TIME + offset, what
    # grant.lua decides with), and a grant taking the organization's confirmed plus pending
    # grants past the limit Redis enforces on its granted total.
    await hydrator.hydrate(org)
    now = await store.now_ms() if expires_at_ms else None
    await hydrator.call(
        "grant",
        ledger.grant,
        org,
        grant_id,
        amount_uecu,
        kind.value,
        expires_at_ms,
        now_ms=now,
        limit_uecu=MAX_GRANTED_UECU,
    )
    hydrator.forget_unknown(org)  # the ledger knows it now
    try:
        return await store.grant(org, grant_id, amount_uecu, kind, expires_at_ms)
    except (GrantAlreadyExpired, BalanceLimit, IdempotencyConflict) as refusal:
        # Redis definitely did not apply it: void the pending grant. (On UNAVAILABLE the
        # outcome is unknown: it stays pending.) A void that fails leaves it pending for the
        # flusher to void.
        try:
            await hydrator.call("void", ledger.void_grant, org, grant_id)
        except StoreUnavailable as exc:
            log.warning(
                "grant %s of %s refused by Redis (%s) and not voided in the ledger yet (%s);"
                " the flusher will",
                grant_id,
                org,
                refusal.reason,
                exc.message,
            )
        raise
