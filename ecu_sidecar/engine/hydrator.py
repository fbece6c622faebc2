"""What the ledger knows and Redis lost: an organization rebuilt, a lost hold's commit settled.

Redis holds derived state; the ledger can always rebuild it (docs/architecture.md, "Rebuild
from the ledger"). Every ledger call runs on a thread, bounded by ECU_LEDGER_TIMEOUT_MS, and
an organization the ledger did not know is not asked about again for
ECU_LEDGER_NEGATIVE_TTL_MS.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Protocol, TypeVar

from ecu_sidecar.errors import (
    AccountNotFound,
    HoldNotFound,
    HoldReleased,
    IdempotencyConflict,
    StoreUnavailable,
)
from ecu_sidecar.ledger.types import LedgerUnavailable
from ecu_sidecar.model import (
    CommitBatchOutcome,
    CommitItem,
    KnownHold,
    LedgerAccount,
    LedgerReservation,
)
from ecu_sidecar.settings import Settings
from ecu_sidecar.store import Store

__all__ = ["UNKNOWN_ORGS_MAX", "Hydrator", "LedgerReader", "ledger_call"]

#: Most organizations remembered as unknown to the ledger (ECU_LEDGER_NEGATIVE_TTL_MS).
UNKNOWN_ORGS_MAX = 10_000

T = TypeVar("T")

log = logging.getLogger(__name__)


class LedgerReader(Protocol):
    """What a rebuild needs of the ledger repository (ecu_sidecar.ledger). Blocking; an
    unreachable database raises ecu_sidecar.ledger.LedgerUnavailable."""

    def ledger_account(self, org: str) -> LedgerAccount | None: ...

    def reservation(self, org: str, reservation_id: str) -> LedgerReservation | None: ...


async def ledger_call(
    executor: Executor, timeout_ms: int, what: str, fn: Callable[..., T], *args: Any, **kw: Any
) -> T:
    """Run a blocking ledger call on a thread, bounded by ``timeout_ms``. The ledger
    unreachable, or slower than that, raises StoreUnavailable (UNAVAILABLE: an unknown outcome
    the caller's retry settles). The thread itself is bounded by the ledger's own connect,
    pool-wait and statement timeouts (open_configured(bounded=True)), so threads of calls given
    up on do not pile up. ``executor``: the ledger's own threads (ECU_LEDGER_THREADS)."""
    try:
        async with asyncio.timeout(timeout_ms / 1000):
            call = functools.partial(fn, *args, **kw)
            return await asyncio.get_running_loop().run_in_executor(executor, call)
    except TimeoutError:
        raise StoreUnavailable(
            f"the ledger did not answer within {timeout_ms} ms ({what})"
        ) from None
    except LedgerUnavailable as exc:
        raise StoreUnavailable(f"the ledger is unavailable ({what}): {exc}") from None


class Hydrator:
    """Rebuilds an organization Redis lacks from the ledger, and settles commits of holds Redis
    has no record of by the ledger's record of them. Without a ledger it knows nothing."""

    def __init__(
        self,
        store: Store,
        settings: Settings,
        ledger: LedgerReader | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.settings = settings
        self.ledger = ledger
        self.clock = clock
        """Monotonic seconds for the negative cache (injected so tests step time)."""
        self.executor = ThreadPoolExecutor(settings.ledger_threads, thread_name_prefix="ecu-ledger")
        """The threads ledger calls run on (ECU_LEDGER_THREADS), nobody else's."""
        self.on_rebuild: Callable[[str], None] = lambda result: None
        """Called with each rebuild's result: ``rebuilt`` (this process rebuilt the
        organization), ``raced`` (another got there first), ``unknown`` (the ledger does not
        know it). The server counts them (ecu_sidecar_rebuilds_total)."""
        self._unknown: OrderedDict[str, float] = OrderedDict()
        """Organizations the ledger did not know (oldest first) -> until when (``clock``)
        that answer stands (ECU_LEDGER_NEGATIVE_TTL_MS)."""

    async def call(self, what: str, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """``fn`` (a blocking ledger method) bounded by ECU_LEDGER_TIMEOUT_MS (ledger_call)."""
        return await ledger_call(
            self.executor, self.settings.ledger_timeout_ms, what, fn, *args, **kw
        )

    # -- the negative cache -------------------------------------------------------------------

    def known_unknown(self, org: str) -> bool:
        """Whether the ledger said recently (ECU_LEDGER_NEGATIVE_TTL_MS) it does not know org."""
        until = self._unknown.get(org)
        if until is None:
            return False
        if self.clock() < until:
            return True
        del self._unknown[org]
        return False

    def forget_unknown(self, org: str) -> None:
        """The ledger knows ``org`` now (a grant was written to it)."""
        self._unknown.pop(org, None)

    def _remember_unknown(self, org: str) -> None:
        ttl_ms = self.settings.ledger_negative_ttl_ms
        if not ttl_ms:
            return
        self._unknown.pop(org, None)
        self._unknown[org] = self.clock() + ttl_ms / 1000
        if len(self._unknown) > UNKNOWN_ORGS_MAX:
            self._unknown.popitem(last=False)

    # -- rebuild ------------------------------------------------------------------------------

    async def hydrate(self, org: str) -> bool:
        """Rebuild ``org`` in Redis from the ledger if Redis lacks it; False if the ledger does
        not know it either (or there is no ledger). Raises StoreUnavailable when the ledger
        cannot answer within ECU_LEDGER_TIMEOUT_MS."""
        if self.ledger is None or self.known_unknown(org):
            return False
        if not await self.store.missing_accounts([org]):
            return True  # Grant asks every time: no ledger read while the account is there
        # The outbox position first: only a position seen fully flushed before the ledger read
        # proves that read holds every event, and the script rebuilds only if nothing moved
        # since ('' never matches: StoreUnavailable, the flusher drains first).
        outbox = await self.store.outbox_state(org)
        account = await self.call("rebuild", self.ledger.ledger_account, org)
        if account is None:
            self._remember_unknown(org)
            self.on_rebuild("unknown")
            return False
        # A no-op if another sidecar got there first.
        rebuilt = await self.store.hydrate(
            account, flushed_id=outbox.last_id if outbox.fully_flushed else ""
        )
        if rebuilt:
            log.warning(
                "organization %s was missing from Redis: rebuilt from the ledger "
                "(balance %d uECU, %d holds)",
                org,
                account.balance_uecu,
                len(account.active_holds),
                extra={"organization": org},
            )
        self.on_rebuild("rebuilt" if rebuilt else "raced")
        return True

    async def hydrating(self, org: str, call: Callable[[], Awaitable[T]]) -> T:
        """``call()``; if Redis lacks the organization, rebuild it and call once more."""
        try:
            return await call()
        except AccountNotFound:
            if not await self.hydrate(org):
                raise
            return await call()

    # -- commits of holds Redis has no record of -----------------------------------------------

    async def settle_commits(
        self, org: str, items: Sequence[CommitItem], outcome: CommitBatchOutcome
    ) -> CommitBatchOutcome:
        """Commits Redis answered HOLD_NOT_FOUND, settled by what the ledger recorded of them
        (one rule before and after a rebuild or a tombstone purge): a committed hold answers
        its recorded outcome (a replay) or a conflict, a released one HOLD_RELEASED, an
        expired or outstanding one is billed as a late commit of that hold (bounded, under the
        commit event id the hold always had, so the ledger never bills it twice), and an id the
        ledger never saw stays HOLD_NOT_FOUND: a reservation id never reserved is never billed."""
        ledger = self.ledger
        if ledger is None:
            return outcome
        outs = list(outcome.outcomes)
        retry: dict[int, KnownHold] = {}
        for i, (it, o) in enumerate(zip(items, outs, strict=True)):
            if not isinstance(o.error, HoldNotFound):
                continue
            rid = it.reservation_id
            rec = await self.call("reservation", ledger.reservation, org, rid)
            if rec is None:
                continue
            if rec.state == "committed":
                assert rec.outcome is not None
                if rec.actual_uecu == it.actual_uecu and rec.usage == it.usage:
                    outs[i] = replace(rec.outcome, available_uecu=outcome.available_uecu)
                else:
                    outs[i] = replace(
                        o,
                        error=IdempotencyConflict(
                            f"hold {rid} was already committed with actual {rec.actual_uecu} "
                            "uECU and other usage or amount",
                            reservation_id=rid,
                        ),
                    )
            elif rec.state == "released":
                outs[i] = replace(
                    o,
                    error=HoldReleased(
                        f"hold {rid} was released; it cannot be committed", reservation_id=rid
                    ),
                )
            else:
                retry[i] = rec.hold
        if retry:
            again = [items[i] for i in retry]
            known = {items[i].reservation_id: hold for i, hold in retry.items()}
            pct = self.settings.overage_max_percent
            second = await self.store.commit(org, again, pct, known=known)
            for i, o in zip(retry, second.outcomes, strict=True):
                outs[i] = o
            outcome = replace(outcome, available_uecu=second.available_uecu)
            if second.outcomes:
                log.warning(
                    "%d commit(s) of %s settled from the ledger's record of their holds",
                    len(retry),
                    org,
                )
        return replace(outcome, outcomes=outs)
