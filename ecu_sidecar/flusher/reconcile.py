"""Reconciliation and rebuilds: Redis's counters checked against the ledger (drift is repaired
and counted), organizations Redis lost rebuilt from the ledger, and a history Redis took back
(a failover, a restart: the node's epoch changed) drained and rebuilt behind a fence.

Run by the flusher's loop between its cycles (flusher/loop.py): a reconciliation needs nothing
pending in the consumer group, so the loop reads no batch ahead into one.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ecu_sidecar.errors import (
    BalanceLimit,
    GrantAlreadyExpired,
    IdempotencyConflict,
    StoreUnavailable,
)
from ecu_sidecar.flusher.ports import FlusherLedger
from ecu_sidecar.metrics import FlusherMetrics
from ecu_sidecar.model import GrantKind, LedgerAccount, LedgerBalance
from ecu_sidecar.settings import Settings
from ecu_sidecar.store.outbox import GROUP
from ecu_sidecar.store.port import Outbox, Store

__all__ = ["Reconciler"]

log = logging.getLogger(__name__)

T = TypeVar("T")

DAY_MS = 86_400_000
#: Balance snapshots one pass deletes at most, or twice its slice if more: above the most a
#: pass writes (one per organization), so what is kept stays bounded.
PRUNE_BATCH = 10_000
#: Organizations one pass checks at once: each is a few Redis round trips of its own (its
#: epoch, its outbox position, the compare script), which one at a time made a pass's time
#: their sum (docs/benchmarks.md, "A reconciliation pass").
CONCURRENCY = 16


class Reconciler:
    """Reconciliation and rebuilds of one flusher."""

    def __init__(
        self,
        store: Store,
        outbox: Outbox,
        ledger: FlusherLedger,
        settings: Settings,
        metrics: FlusherMetrics,
        flush_once: Callable[[], Awaitable[int]],
    ) -> None:
        self.store = store
        self.outbox = outbox
        self.ledger = ledger
        self.settings = settings
        self.metrics = metrics
        self.flush_once = flush_once
        """One flush cycle without read-ahead (a fenced rebuild drains the outbox with it)."""
        self._after: str | None = None
        """The last organization of the last pass's slice (None: a cycle starts over)."""
        self._known_epochs: set[str] = set()
        """The Redis node epochs (run id and replication id) the last pass saw."""
        self._cycle_started = 0.0
        self._hydrate_after = ""
        """The last organization the last sliced hydrate_missing checked ('' : start over)."""
        self._fenced = asyncio.Lock()
        """Held by a fenced rebuild: its drain runs the flusher's cycle, which is one at a time
        (the organizations of a pass are checked concurrently)."""

    def next_slice(self, orgs: list[str]) -> list[str]:
        """The next ECU_RECONCILE_BATCH organizations of ``orgs`` (in name order) after the
        last slice's, so that each is visited within ceil(len(orgs) / batch) passes however
        organizations come and go. The slice reaching the last one ends a cycle."""
        ordered = sorted(orgs)
        start = 0 if self._after is None else bisect.bisect_right(ordered, self._after)
        if start == 0 or start >= len(ordered):
            start = 0
            self._cycle_started = time.monotonic()
        taken = ordered[start : start + self.settings.reconcile_batch]
        self._after = taken[-1] if start + len(taken) < len(ordered) else None
        return taken

    async def reconcile_next(self, orgs: list[str]) -> dict[str, int]:
        """Reconcile the next slice of ``orgs`` (see next_slice); when it ends a cycle,
        ``ecu_reconcile_cycle_seconds`` says how long the cycle took.

        A changed history is not left to the slice: every pass reads each Redis node's epoch
        (one INFO per node), and when a node shows an epoch the last pass did not see (a
        failover, a restart, or this flusher's first pass), every organization on that node
        has its history checked in this pass, and is rebuilt behind a fence if it changed."""
        epochs = await self._guard("the nodes' epochs", self.store.epochs(orgs))
        if epochs is None:
            return {}
        fresh = {e for e in epochs.values() if e} - self._known_epochs
        checked: dict[str, bool | None] = {}  # org -> its history changed (None: the check failed)
        for org in orgs if fresh else ():
            if epochs[org] in fresh:
                checked[org] = await self._guard(org, self._history_changed(org, epochs[org]))
        self._known_epochs = {e for e in epochs.values() if e}
        slice_ = [org for org in self.next_slice(orgs) if checked.get(org, False) is False]
        # Checked just now: the history check is not made (nor its failure counted) twice.
        drifts = await self.reconcile(
            slice_, {org: "" if org in checked else epochs[org] for org in slice_}
        )
        if self.settings.snapshot_retention_days:
            await self._guard(
                "the snapshots' retention",
                asyncio.to_thread(
                    self.ledger.prune_snapshots,
                    self.settings.snapshot_retention_days * DAY_MS,
                    limit=max(PRUNE_BATCH, 2 * self.settings.reconcile_batch),
                ),
            )
        if self._after is None:
            self.metrics.cycle_seconds.set(time.monotonic() - self._cycle_started)
        return drifts

    async def reconcile(
        self, orgs: list[str], epochs: dict[str, str] | None = None
    ) -> dict[str, int]:
        """Compare each fully flushed organization's ledger balance with Redis; repair drift.
        Returns {org: drift} for the organizations checked (skipped ones are absent).

        The ledger is read cheaply and in bulk (``balances``: the balance and whether pending
        grants wait); an organization's full state (``ledger_account``) only for one that needs
        it: pending grants to finish, lost keys to rebuild, a history to rebuild. Each outbox
        position is read before the ledger, so the ledger holds at least every event up to it.

        Each organization is checked on its own, CONCURRENCY at once: one that fails (a grant
        Redis refuses, a ledger or Redis error for it) is logged and counted in
        ``ecu_flusher_reconcile_errors_total``, and the pass goes on with the others, so one
        organization never stops the others' repairs nor slows the flushing down."""
        lost: set[str] = set()
        if epochs is None:
            epochs = await self.store.epochs(orgs)
        # org -> the outbox position the ledger holds all of
        flushed = await self._each(orgs, lambda org: self._flushed_position(org, epochs[org]))
        balances = (
            await self._guard(
                "the ledger balances", asyncio.to_thread(self.ledger.balances, list(flushed))
            )
            or {}
        )
        known = [org for org in flushed if org in balances]  # the others: unknown to the ledger
        drifts = await self._each(
            known, lambda org: self._compare(org, flushed[org], balances[org], lost)
        )
        self.metrics.key_loss_accounts.set(len(lost))
        self.metrics.drift_accounts.set(sum(1 for d in drifts.values() if d))
        self.metrics.drift_uecu.set(sum(abs(d) for d in drifts.values()))
        self.metrics.repairs.inc(sum(1 for d in drifts.values() if d))
        return drifts

    async def _each(
        self, orgs: list[str], step: Callable[[str], Awaitable[T | None]]
    ) -> dict[str, T]:
        """{org: step(org)} for each of ``orgs`` whose step answered (not None, not failed:
        see _guard), CONCURRENCY at a time. Each organization's keys are its own."""
        gate = asyncio.Semaphore(CONCURRENCY)

        async def one(org: str) -> tuple[str, T | None]:
            async with gate:
                return org, await self._guard(org, step(org))

        return {org: r for org, r in await asyncio.gather(*map(one, orgs)) if r is not None}

    async def _guard(self, what: str, step: Awaitable[T]) -> T | None:
        """``step``'s result, or None when it failed (logged and counted)."""
        try:
            return await step
        except Exception as exc:
            self.metrics.reconcile_errors.inc()
            log.error(
                "reconciling %s failed (%s: %s); going on with the other organizations",
                what,
                type(exc).__name__,
                getattr(exc, "message", exc),
            )
            return None

    async def _flushed_position(self, org: str, epoch: str) -> str | None:
        """The outbox position up to which the ledger holds every event of ``org``, or None
        to skip it this pass (not fully flushed; or Redis changed history under it, and it
        was rebuilt behind a fence)."""
        if epoch and await self._history_changed(org, epoch):
            return None
        state = await self.outbox.state(org)
        return state.last_id if state.fully_flushed else None

    async def _history_changed(self, org: str, epoch: str) -> bool:
        """Whether Redis changed ``org``'s history under it (its account records another node
        epoch than ``epoch``); if so it is rebuilt from the ledger now, behind a fence."""
        fence_ms = self.settings.rebuild_fence_ms
        if await self.store.check_epoch(org, epoch, fence_ms) is None:
            return False
        async with self._fenced:
            # Checked again, one organization at a time: its fence starts now (not while
            # another's rebuild ran), and another flusher may have rebuilt it meanwhile.
            was = await self.store.check_epoch(org, epoch, fence_ms)
            if was is None:
                return True  # rebuilt meanwhile: compared next pass
            # A failover or restart took back changes the ledger may hold: rebuilt whole from
            # the ledger now, under traffic (a fence holds changes while it drains).
            log.error(
                "Redis holding %s changed history (%s, was %s): rebuilding it from the ledger",
                org,
                epoch,
                was,
            )
            if await self._drain_and_rebuild(org):
                self.metrics.history_rebuilds.inc()
        return True

    async def _compare(
        self, org: str, last_id: str, balance: LedgerBalance, lost: set[str]
    ) -> int | None:
        """Reconcile one organization against its ledger balance; its drift, or None when
        skipped (or rebuilt: its keys were found lost, and it joins ``lost``)."""
        if balance.unconfirmed_grants:
            # Every Redis event is in the ledger, yet pending ledger-first grants have none:
            # Redis never applied them (the caller died between the two writes, or did not
            # hear Redis's answer). Finish them (a grant Redis did apply meanwhile answers as
            # a replay) or void those Redis refuses.
            account = await asyncio.to_thread(self.ledger.ledger_account, org)
            if account is not None and account.unconfirmed_grants:
                await self._finish_grants(org, account.unconfirmed_grants)
            return None  # the new grant events must be flushed before balances compare
        expected = balance.balance_uecu
        checked = await self.store.reconcile(org, last_id, expected, GROUP, balance.open_jobs)
        if checked.key_loss:
            # A key lost beside the account (eviction, a manual DEL): the organization is
            # rebuilt whole from the ledger, for the same outbox position (read before it).
            lost.add(org)
            log.error("keys of %s lost (%s): rebuilding it from the ledger", org, checked.key_loss)
            account = await asyncio.to_thread(self.ledger.ledger_account, org)
            if account is not None:
                await self._rebuild(account, last_id, force=True)
            return None
        drift = checked.drift_uecu
        if drift is None:
            return None
        if drift or balance.snapshot_due:  # what says something: a drift, or a daily mark
            await asyncio.to_thread(self.ledger.record_snapshot, org, expected, expected + drift)
        if drift:
            log.warning("drift in %s: Redis was %+d uECU off the ledger; repaired", org, drift)
        return drift

    async def rebuild_fenced(self, org: str) -> bool:
        """Drain the fenced organization's outbox into the ledger, then rebuild it from there
        (which records the node's epoch and lifts the fence). False when the drain did not finish
        within the fence (another flusher's entries not yet claimable, the ledger down): the
        fence lapses, and the next pass fences again."""
        async with self._fenced:
            return await self._drain_and_rebuild(org)

    async def _drain_and_rebuild(self, org: str) -> bool:
        deadline = time.monotonic() + self.settings.rebuild_fence_ms / 1000
        while time.monotonic() < deadline:
            state = await self.outbox.state(org)
            if state.fully_flushed:
                account = await asyncio.to_thread(self.ledger.ledger_account, org)
                if account is None:
                    log.error("cannot rebuild %s: the ledger has no account for it", org)
                    return False
                try:
                    return await self._rebuild(account, state.last_id, force=True)
                except StoreUnavailable:  # an entry arrived since the look: drain again
                    continue
            if not await self.flush_once():
                await asyncio.sleep(0.02)  # entries pending with another flusher
        log.warning("rebuild of %s waits: its outbox did not drain within the fence", org)
        return False

    async def _finish_grants(self, org: str, grants: list[tuple[str, int, str, int]]) -> None:
        """Apply pending ledger-first grants to Redis; void those Redis definitely refuses."""
        for grant_id, amount, kind, expires_at in grants:
            try:
                await self.store.grant(org, grant_id, amount, GrantKind(kind), expires_at)
                log.warning("applied ledger-first grant %s of %s to Redis", grant_id, org)
            except (GrantAlreadyExpired, BalanceLimit, IdempotencyConflict) as exc:
                # Redis will never apply it as recorded: it leaves the pending set for good
                # (a grant event for it, should Redis have applied it otherwise, confirms it).
                voided = await asyncio.to_thread(self.ledger.void_grant, org, grant_id)
                if voided:
                    self.metrics.grants_voided.inc()
                log.error(
                    "ledger-first grant %s of %s refused by Redis (%s: %s); %s",
                    grant_id,
                    org,
                    exc.reason,
                    exc.message,
                    "voided" if voided else "no longer pending",
                )

    async def hydrate_missing(self, batch: int | None = None) -> list[str]:
        """Rebuild the organizations the ledger knows and Redis has lost: every one, or with
        ``batch`` the next ``batch`` of the ledger's organizations in name order after the
        last call's (round-robin), so that a pass reads and checks as many at 100,000
        organizations as at 100 (an organization in use is rebuilt by its first call anyway)."""
        if batch is None:
            orgs = await asyncio.to_thread(self.ledger.organizations)
        else:
            orgs = await asyncio.to_thread(self.ledger.organizations, self._hydrate_after, batch)
            self._hydrate_after = orgs[-1] if len(orgs) == batch else ""
        missing = await self.store.missing_accounts(orgs)
        rebuilt = []
        for org in missing:
            if await self.hydrate(org):
                rebuilt.append(org)
        return rebuilt

    async def hydrate(self, org: str) -> bool:
        """Rebuild one organization from the ledger if Redis lacks it (race-free). Only once its
        outbox is fully flushed (the ledger must hold every event): until then False, and a
        later pass, after the flush, rebuilds it."""
        state = await self.outbox.state(org)  # before the ledger read: see RedisStore.hydrate
        if not state.fully_flushed:
            log.warning("rebuild of %s waits for its outbox to reach the ledger", org)
            return False
        account = await asyncio.to_thread(self.ledger.ledger_account, org)
        if account is None:
            return False
        return await self._rebuild(account, state.last_id)

    async def _rebuild(
        self, account: LedgerAccount, flushed_id: str, *, force: bool = False
    ) -> bool:
        done = await self.store.hydrate(account, flushed_id=flushed_id, force=force)
        if done:
            self.metrics.hydrations.inc()
            log.warning(
                "rebuilt %s from the ledger (balance %d uECU, %d holds restored)",
                account.organization,
                account.balance_uecu,
                len(account.active_holds),
            )
        return done
