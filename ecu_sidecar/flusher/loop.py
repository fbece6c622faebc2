"""The flush loop: moves every outbox event into the ledger exactly once, keeps Redis and the
ledger in agreement, and rebuilds organizations Redis has lost.

One cycle: read new entries (consumer group ``ledger``) and entries a dead flusher left pending
for ``ECU_FLUSHER_CLAIM_IDLE_MS`` → write them in ONE ledger transaction (each event id applied
at most once: ``ON CONFLICT DO NOTHING``) → acknowledge and delete them in Redis. A crash
before the transaction loses nothing (the entries stay pending and are claimed again); a crash
after the commit and before the acknowledgement re-delivers events whose ids the ledger
already holds, so they change nothing. Several flushers may run at once: the group hands each
entry to one of them, and a claimed entry written twice is still applied once.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

from ecu_sidecar.errors import AccountNotFound, StoreUnavailable
from ecu_sidecar.flusher.ports import FlusherLedger
from ecu_sidecar.flusher.reconcile import Reconciler
from ecu_sidecar.metrics import FlusherMetrics, StoreMetrics
from ecu_sidecar.settings import Settings
from ecu_sidecar.store.outbox import OutboxEntry
from ecu_sidecar.store.port import Store

__all__ = ["Flusher"]

log = logging.getLogger(__name__)

#: Events that change how many jobs are open (ecu_jobs_open).
_JOB_EVENTS = frozenset({"job_open", "job_close"})


class Flusher:
    """One flusher process's loop (also run inside ``serve`` for the embedded default)."""

    def __init__(
        self,
        store: Store,
        ledger: FlusherLedger,
        settings: Settings,
        metrics: FlusherMetrics,
        *,
        consumer: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.ledger = ledger
        self.settings = settings
        self.metrics = metrics
        if store.metrics is None:  # `ecu-sidecar flush`: its own store, its own registry
            store.metrics = StoreMetrics.of(metrics.registry)
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.reader = store.outbox(self.consumer)
        self.reconciler = Reconciler(
            store, self.reader, ledger, settings, metrics, lambda: self.flush_once(read_ahead=False)
        )
        self._orgs: list[str] = []
        self._next_discovery = 0.0
        self._next_reconcile = 0.0
        self._next_hydrate = 0.0
        self._next_claim = 0.0
        self._backlogged: set[str] = set()
        """Streams whose last read filled their share: more is probably waiting there."""
        self._claim_from: dict[str, str] = {}
        """Streams whose last claim stopped short of the end of their pending entries, and
        where to go on: a backlog another flusher left, taken over in full batches."""
        self._taking_over = False
        """Draining (``flush --once``, the final flush): claim every pending entry, whoever
        holds it and however briefly."""
        self._clock = clock
        self.last_progress = clock()
        """When (``clock``) a cycle last succeeded, or the flusher was made (liveness)."""
        self._batches = 0
        self._unwritten: tuple[list[OutboxEntry], Any] = ([], None)
        self._reread = False
        self._ahead: asyncio.Future[tuple[list[OutboxEntry], Any]] | None = None
        """The next batch's read and validation, started while the ledger writes this one."""
        self._jobs_counted = False

    # -- fault injection (tests kill the process at the dangerous points) --------------------

    def _maybe_die(self, point: str) -> None:
        fault = self.settings.flusher_fault
        if not fault:
            return
        name, _, nth = fault.partition(":")
        if name == point and self._batches == int(nth or 1):
            log.warning("fault injection: SIGKILL at %s of batch %d", point, self._batches)
            os.kill(os.getpid(), signal.SIGKILL)

    # -- one cycle --------------------------------------------------------------------------

    async def discover(self, force: bool = False) -> list[str]:
        """Refresh the list of organizations with an outbox (every discovery interval)."""
        now = time.monotonic()
        if force or now >= self._next_discovery:
            self._orgs = await self.reader.discover()
            self._next_discovery = now + self.settings.flusher_discovery_interval_ms / 1000
        return self._orgs

    async def flush_once(self, *, read_ahead: bool = True) -> int:
        """Move one batch from the outboxes into the ledger; returns how many entries.

        With ``read_ahead``, the next batch is read from Redis and validated while the ledger
        writes this one, and the next call writes it.
        """
        orgs = await self.discover()
        if self._unwritten[0]:  # a batch the ledger refused last time: retry it first
            entries, parsed = self._unwritten
        else:
            entries, parsed = await self._next_batch(orgs)
        if not self._jobs_counted:
            await self._count_open_jobs()
        if not entries:
            return 0
        try:
            # The ledger takes only what a failover cannot take back out of Redis (with
            # ECU_REDIS_WAIT_REPLICAS set): else it would hold events Redis lost.
            await self.store.confirm_durable({e.org for e in entries})
        except StoreUnavailable:
            self._unwritten = (entries, parsed)  # delivered to us: retried first next cycle
            raise
        self._batches += 1
        self._maybe_die("before_insert")
        started = time.perf_counter()
        if read_ahead and self._ahead is None and orgs and not self._reread:
            # They stay pending in Redis until their own batch has committed and is
            # acknowledged, like any entry read: a crash meanwhile loses nothing.
            self._ahead = asyncio.ensure_future(self._read_ahead(orgs))
            self._ahead.add_done_callback(_retrieved)  # a failure is raised when used
        try:
            result = await asyncio.to_thread(
                self.ledger.write_events,
                parsed if parsed is not None else [e.fields for e in entries],
            )
        except Exception:
            self._unwritten = (entries, parsed)
            self.metrics.write_errors.inc()
            raise
        self._unwritten = ([], None)
        self._maybe_die("after_commit")
        await self.reader.ack(entries)
        self.metrics.batch_seconds.observe(time.perf_counter() - started)
        self.metrics.batch_size.observe(len(entries))
        self.metrics.events.labels("written").inc(result.inserted)
        self.metrics.events.labels("duplicate").inc(result.duplicates)
        if result.quarantined:
            self.metrics.events.labels("quarantined").inc(result.quarantined)
            log.error(
                "%d outbox events quarantined in the ledger (see ledger.quarantined())",
                result.quarantined,
            )
        self.metrics.count_events(result.applied)  # money by job type, notices, jobs
        if any(e.type in _JOB_EVENTS for e in result.applied):
            await self._count_open_jobs()
        return len(entries)

    async def _count_open_jobs(self) -> None:
        """Set ecu_jobs_open from the ledger: at the first cycle, then whenever a batch
        recorded a job's open or end."""
        self.metrics.jobs_open.set(await asyncio.to_thread(self.ledger.open_jobs))
        self._jobs_counted = True

    async def _next_batch(self, orgs: list[str]) -> tuple[list[OutboxEntry], Any]:
        """Entries claimed from silent flushers, and new ones: read (and validated) during the
        previous batch's write when there was one, else now. Returns the entries, and what the
        ledger's parse_events made of them, or None when not done yet."""
        claimed = await self._claim(orgs)
        fresh: list[OutboxEntry] = []
        parsed = None
        if self._ahead is not None:
            ahead, self._ahead = self._ahead, None
            fresh, parsed = await ahead  # a failed read raises here (and set _reread)
        if not fresh and len(claimed) < self.settings.flusher_batch:
            fresh = await self._read(orgs)
        if claimed:
            # A claim with a short idle time also returns what this consumer read ahead.
            held = {(e.org, e.entry_id) for e in fresh}
            claimed = [e for e in claimed if (e.org, e.entry_id) not in held]
        if claimed:
            return claimed + fresh, None  # rare: validated with the write
        return fresh, parsed

    async def _claim(self, orgs: list[str]) -> list[OutboxEntry]:
        """Entries left pending by silent flushers (every pending entry while draining)."""
        idle_ms = self.settings.flusher_claim_idle_ms
        now = time.monotonic()
        due = now >= self._next_claim
        # Between rounds, only the streams whose last claim stopped short: a dead flusher's
        # backlog is taken over batch after batch, not a share every idle_ms / 2.
        targets = orgs if due or self._taking_over else [o for o in orgs if o in self._claim_from]
        if not targets:
            return []
        share = self._per_stream(orgs)
        more = max(share, self.settings.flusher_batch // max(1, len(self._claim_from)))
        counts = {org: more if org in self._claim_from else share for org in targets}
        claimed, self._claim_from = await self.reader.claim(
            targets, 0 if self._taking_over else idle_ms, counts, self._claim_from
        )
        if due:
            # Entries become claimable after idle_ms: looking every idle_ms / 2 finds them
            # at most half that late, without a claim round trip in every cycle.
            self._next_claim = now + idle_ms / 2000
        return claimed

    async def _read_ahead(self, orgs: list[str]) -> tuple[list[OutboxEntry], Any]:
        entries = await self._read(orgs)
        if not entries:
            return entries, None
        try:
            # Validation off the event loop, while the ledger's thread waits for the database.
            parsed = await asyncio.to_thread(self.ledger.parse_events, [e.fields for e in entries])
        except BaseException:
            self._reread = True  # read and delivered to us, but never written: read them again
            raise
        return entries, parsed

    async def _read(self, orgs: list[str]) -> list[OutboxEntry]:
        counts = self._counts(orgs)
        try:
            entries = await self.reader.read(orgs, counts, own_pending=self._reread)
        except (StoreUnavailable, asyncio.CancelledError):
            # The reply may have been lost after Redis delivered the entries to us: read our
            # own pending entries next time instead of waiting for a claim.
            self._reread = True
            raise
        self._reread = False
        got = collections.Counter(e.org for e in entries)
        self._backlogged = {org for org, n in got.items() if n >= counts[org]}
        return entries

    def _per_stream(self, orgs: list[str]) -> int:
        # ECU_FLUSHER_BATCH bounds a whole cycle, spread over the streams, so a backlog in
        # many outboxes never asks Redis for more than one reply can carry in time.
        return max(1, self.settings.flusher_batch // max(1, len(orgs)))

    def _counts(self, orgs: list[str]) -> dict[str, int]:
        """What to ask of each stream: its share of ECU_FLUSHER_BATCH, and the streams that
        filled their share last time (a backlog) share the batch among themselves, so that a
        backlog in one outbox among many still moves in full batches. At most twice the
        batch in all."""
        share = self._per_stream(orgs)
        backlogged = self._backlogged.intersection(orgs)
        more = max(share, self.settings.flusher_batch // max(1, len(backlogged)))
        return {org: more if org in backlogged else share for org in orgs}

    async def drain(self) -> int:
        """Flush until a cycle finds nothing left to move; returns entries moved.

        For ``flush --once`` and the final flush at shutdown: every cycle also claims every
        entry pending with any consumer, however briefly, so that what a dead flusher left
        moves now rather than after ECU_FLUSHER_CLAIM_IDLE_MS. An entry claimed from a live
        flusher is written by both, and the ledger applies its event id once."""
        await self.discover(force=True)
        total = 0
        self._taking_over = True
        try:
            while True:
                n = await self.flush_once()
                total += n
                if n == 0 and not self._claim_from:
                    return total
        finally:
            self._taking_over = False

    # -- reconciliation and rebuilds (flusher/reconcile.py) ----------------------------------

    async def reconcile(self) -> dict[str, int]:
        """Reconcile the next ECU_RECONCILE_BATCH organizations, round-robin (see
        Reconciler.next_slice and Reconciler.reconcile)."""
        return await self.reconciler.reconcile_next(await self.discover(force=True))

    async def hydrate_missing(self, batch: int | None = None) -> list[str]:
        """Rebuild the organizations the ledger knows and Redis has lost: all, or the next
        ``batch`` of them (see Reconciler.hydrate_missing)."""
        return await self.reconciler.hydrate_missing(batch)

    async def hydrate(self, org: str) -> bool:
        """Rebuild one organization from the ledger if Redis lacks it (see Reconciler.hydrate)."""
        return await self.reconciler.hydrate(org)

    async def observe(self) -> None:
        """Outbox length, lag and pending gauges over every known organization, from Redis
        alone (whatever the ledger does); entries acknowledged but left in a stream (a crash
        between XACK and XDEL) are deleted on the way, and the lag is the age of the oldest
        entry not acknowledged."""
        backlog = await self.reader.backlog(self._orgs, tidy=True)
        if backlog.removed:
            self.metrics.leftovers_removed.inc(backlog.removed)
            log.info("removed %d acknowledged outbox entries left in Redis", backlog.removed)
        self.metrics.outbox_length.set(backlog.length)
        self.metrics.pending.set(backlog.pending)
        oldest = backlog.oldest_ms
        self.metrics.lag_seconds.set(0 if oldest is None else max(0.0, time.time() - oldest / 1000))
        holds, held = await self.store.hold_totals(self._orgs)
        self.metrics.holds_outstanding.set(holds)
        self.metrics.held_uecu.set(held)
        for org in self.settings.metrics_org_list:  # opt-in, bounded (ECU_METRICS_ORGS)
            try:
                b = await self.store.balance(org)
            except AccountNotFound:
                self.metrics.forget_organization(org)
                continue
            self.metrics.organization(org, b.balance_uecu, b.held_uecu)

    async def forget_dead_consumers(self) -> int:
        """Remove the consumers (dead flushers) with nothing pending that have been idle for
        ECU_FLUSHER_DEAD_CONSUMER_MS; returns how many."""
        n = await self.reader.forget_consumers(self._orgs, self.settings.flusher_dead_consumer_ms)
        if n:
            self.metrics.consumers_removed.inc(n)
            log.info("removed %d idle outbox consumers with nothing pending", n)
        return n

    def stalled_s(self) -> float:
        """Seconds since a cycle last succeeded (or since the flusher was made)."""
        return max(0.0, self._clock() - self.last_progress)

    def liveness(self) -> tuple[bool, str]:
        """Whether a cycle succeeded within ECU_FLUSHER_STALL_TIMEOUT_MS, and a line saying
        so (``/livez``). An empty cycle succeeds; one failing on Redis or the ledger, or one
        that hangs, does not: a flusher that makes no progress is restarted by its probe."""
        stalled, limit = self.stalled_s(), self.settings.flusher_stall_timeout_ms / 1000
        if stalled < limit:
            return True, f"ok: the last flusher cycle succeeded {stalled:.1f}s ago"
        return False, (
            f"stalled: no flusher cycle succeeded for {stalled:.0f}s "
            f"(ECU_FLUSHER_STALL_TIMEOUT_MS={self.settings.flusher_stall_timeout_ms})"
        )

    async def _observe_loop(self, stop: asyncio.Event) -> None:
        """Gauges and tidying on their own cadence (ECU_FLUSHER_OBSERVE_INTERVAL_MS), beside
        the cycles: a ledger outage stops the cycles, never the lag alerts."""
        interval = self.settings.flusher_observe_interval_ms / 1000
        while not stop.is_set():
            try:
                await self.discover()
                await self.observe()
                await self.forget_dead_consumers()
            except StoreUnavailable as exc:
                log.debug("flusher: cannot observe the outboxes: %s", exc.message)
            except Exception as exc:
                log.warning(
                    "flusher: observing the outboxes failed (%s: %s)", type(exc).__name__, exc
                )
            try:
                await asyncio.wait_for(stop.wait(), timeout=interval)
            except TimeoutError:
                pass

    # -- the loop -------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Flush, reconcile and hydrate until ``stop`` is set; back off while a side is down."""
        observer = asyncio.create_task(self._observe_loop(stop), name="ecu-flusher-observe")
        try:
            await self._cycles(stop)
        finally:
            # Bounded: on Python 3.11 a cancellation landing as a call completes can be
            # swallowed (CPython gh-86296); the loop then ends at its next look at ``stop``.
            observer.cancel()
            await asyncio.wait([observer], timeout=self.reader.timeout_s + 1)
        if self._ahead is not None:
            # Let a read ahead finish (it is bounded) so that the final drain writes what it
            # took, rather than leaving it pending until another flusher claims it.
            await asyncio.wait([self._ahead])

    async def _cycles(self, stop: asyncio.Event) -> None:
        backoff = 0.0
        interval = self.settings.flusher_interval_ms / 1000
        while not stop.is_set():
            try:
                # No read ahead into a reconciliation: it needs nothing pending in the group.
                moved = await self.flush_once(read_ahead=time.monotonic() < self._next_reconcile)
                now = time.monotonic()
                if now >= self._next_reconcile:
                    await self.hydrate_missing(self.settings.reconcile_batch)
                    await self.reconcile()
                    self._next_reconcile = now + self.settings.reconcile_interval_ms / 1000
                backoff = 0.0
                self.metrics.last_success.set(time.time())
                self.last_progress = self._clock()
            except StoreUnavailable as exc:
                moved = 0
                self.metrics.failed_cycles.labels("redis").inc()
                backoff = min(max(backoff * 2, 0.05), 5.0)
                # Redis may have failed over or restarted: look for lost history (epochs)
                # in the first cycle that reaches it again, not a reconcile interval later.
                self._next_reconcile = 0.0
                log.warning(
                    "flusher: Redis unavailable (%s); retrying in %.2fs", exc.message, backoff
                )
            except Exception as exc:  # the ledger is down or refusing: keep the batch, back off
                moved = 0
                self.metrics.failed_cycles.labels("ledger").inc()
                backoff = min(max(backoff * 2, 0.05), 5.0)
                log.warning("flusher: ledger write failed (%s); retrying in %.2fs", exc, backoff)
            if moved and not backoff:
                continue  # more may be waiting: no pause while draining a backlog
            try:
                await asyncio.wait_for(stop.wait(), timeout=backoff or interval)
            except TimeoutError:
                pass


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # marks it retrieved: flush_once raises it when it takes the batch
